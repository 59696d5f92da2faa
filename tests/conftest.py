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


@pytest.fixture(scope="module")
def capsys_holder():
    """capsys is function-scoped, which hypothesis refuses; this captures by hand instead."""
    import contextlib
    import io

    class Holder:
        def __init__(self):
            self.err = io.StringIO()
            self.out = io.StringIO()

        def readouterr(self):
            result = type("Captured", (), {"out": self.out.getvalue(), "err": self.err.getvalue()})
            self.out.seek(0), self.out.truncate(), self.err.seek(0), self.err.truncate()
            return result

    holder = Holder()
    with contextlib.redirect_stderr(holder.err), contextlib.redirect_stdout(holder.out):
        yield holder
