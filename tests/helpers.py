"""Tiny models for the tests: built here, never downloaded."""

import argparse

import torch

from cbs_convert.families import FAMILIES

TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, head_dim=8,
    mlp_hidden=64, num_classes=10, label_rows=11, class_dropout_prob=0.1, learn_sigma=True,
)


def tiny_config(family="sit", **overrides):
    config = dict(TINY)
    config.update({"path": "linear"} if family == "sit" else {"beta_schedule": "linear", "diffusion_steps": 1000})
    config.update(overrides)
    return config


def tiny_model(family="sit", seed=0, **overrides):
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = FAMILIES[family].build(config).eval()
    return FAMILIES[family](config), model


def save_training_dict(path, model, num_heads, model_name="SiT-tiny/2"):
    """The layout of the official training scripts: model, ema, opt, args (an argparse.Namespace)."""
    sd = model.state_dict()
    torch.save(
        # the official scripts save num_classes among the args; it settles whether the table has a null row
        {"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model=model_name, num_heads=num_heads, num_classes=10)},
        path,
    )
