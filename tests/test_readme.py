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


# -- the README's first command, with only what it installs ----------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tomllib  # noqa: E402

import pytest  # noqa: E402

# distributions whose import name is not their own name
IMPORT_NAMES = {"scikit-learn": "sklearn", "PyYAML": "yaml"}
# The demo's own settings, shrunk: the stages, the write and the quality line all still run.
SMALL = ["--steps", "4", "--pool-size", "16", "--ode-steps", "3", "--grid", "4", "--profile-batches", "1",
         "--profile-batch-size", "4", "--calib-batches", "1", "--eval-samples", "8", "--quiet"]
# Hides packages from the child as an uninstalled one would be: imports fail and find_spec says no.
BLOCKER = """
import importlib.util, runpy, sys
blocked = set(sys.argv[1].split(",")) - {""}
for name in blocked:
    sys.modules[name] = None
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in blocked else find_spec(name, *a)
sys.argv = ["cbs_convert", *sys.argv[2:]]
runpy.run_module("cbs_convert", run_name="__main__", alter_sys=True)
"""


def _module_of(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    return IMPORT_NAMES.get(name, name.lower().replace("-", "_"))


def first_command():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    install, _, run = block.splitlines()[0].partition(" && ")
    extras = re.search(r"\.\[([^\]]*)\]", install)
    return [e.strip() for e in extras.group(1).split(",")] if extras else [], run.split()


def not_installed_by(extras):
    """The optional dependencies' modules that ``pip install -e '.[extras]'`` leaves out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    kept = {_module_of(r) for r in project["dependencies"]}
    for extra in extras:
        kept |= {_module_of(r) for r in project["optional-dependencies"][extra]}
    optional = {_module_of(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return sorted(optional - kept)


@pytest.mark.parametrize("also_missing", [[], ["sklearn"]], ids=["as-installed", "without-scikit-learn"])
def test_the_readme_first_command_runs_with_only_what_it_installs(tmp_path, also_missing):
    extras, command = first_command()
    assert command[:3] == ["python", "-m", "cbs_convert"], "the first command changed: update this test with it"
    blocked = not_installed_by(extras) + also_missing
    out = tmp_path / "demo.safetensors"
    run = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(blocked), *command[3:], *SMALL, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert out.exists() and "internal error" not in run.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    if also_missing:
        skip = [line for line in run.stdout.splitlines() if "not scored" in line]
        assert len(skip) == 1 and "scikit-learn is not installed" in skip[0] and "cbs_convert[demo]" in skip[0]
    else:
        assert re.search(r"samples \(500, same noise, digits classifier\): FD \d", run.stdout), run.stdout
    assert ("skipped" in report["sample_quality"]) == bool(also_missing)


def test_the_readme_installs_the_cpu_build_within_the_projects_torch_bounds():
    # Outside the bounds, `pip install -e .` would swap the CPU build for PyPI's CUDA one; without
    # torchvision beside it, timm's torchvision would pull the CUDA torch back in.
    text = (ROOT / "README.md").read_text()
    lines = [line for line in text.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert len(lines) == 1, lines
    words = lines[0].split()
    assert words[:2] == ["pip", "install"] and words[-2:] == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(r for r in project["dependencies"] if _module_of(r) == "torch")
    assert f"'{torch_requirement.replace(' ', '')}'" in words and "torchvision" in words, (words, torch_requirement)
