"""The README's library example runs as written (against the bundled teacher, at tiny sizes)."""

import re
from pathlib import Path

import torch

import cbs_convert

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "cbs_convert" / "assets" / "digits_sit.safetensors"
CONSTANTS = 'CHECKPOINT, SAMPLES, STEPS = "SiT-XL-2-256.pt", 256, 5000'


def library_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The stages as a library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs_against_the_bundled_teacher(tmp_path, monkeypatch):
    code = library_example()
    assert code.count(CONSTANTS) == 1, "the example's size line changed: update this test with it"
    # Only the sizes change: the bundled teacher, few samples, a few steps.
    code = code.replace(CONSTANTS, f'CHECKPOINT, SAMPLES, STEPS = {str(DIGITS)!r}, 32, 3')
    code = code.replace("torch.linspace(0.02, 0.98, 24)", "torch.linspace(0.02, 0.98, 4)")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    routed = cbs_convert.load(tmp_path / "mine.safetensors")
    assert len(routed.experts) == 2 and routed.metadata["boundaries"] == namespace["split"].boundaries
    x = torch.randn(4, *routed.family.sample_shape(routed.family.config))
    with torch.no_grad():
        out = routed(x, routed.family.native_time(torch.tensor([0.1, 0.4, 0.6, 0.9])), torch.arange(4))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the file says what the CLI's files say: where it came from, the profile and the split
    meta = routed.metadata
    assert meta["source"]["sha256"] == namespace["source"].sha256 and meta["source"]["params"] == 1_274_372
    assert meta["split"]["boundaries"] == namespace["split"].boundaries
    assert meta["profile"]["grid"] == namespace["prof"].to_dict()["grid"]
