import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


@pytest.fixture
def tiny_sit():
    from helpers import tiny_model

    return tiny_model("sit")


@pytest.fixture
def tiny_dit():
    from helpers import tiny_model

    return tiny_model("dit")
