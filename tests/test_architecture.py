"""The package's shape, as ARCHITECTURE.md draws it: layers that only look down, no cycles, imports
where a reader sees them, rooms of one purpose, and architectures named only inside families/.

These read the source, not the behaviour: a change that breaks one of them changes the map, so the
map (ARCHITECTURE.md, and LAYERS here) has to change with it, on purpose.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cbs_convert"

#: bottom to top; a module may import its own layer or any layer below it, never one above
LAYERS = [
    ("errors", "bundled"),
    ("families",),
    ("models",),
    ("storage",),
    ("stages",),
    ("sample",),
    ("evaluation",),
    ("pipeline",),
    ("cli",),
]
#: entry points: run as programs or read as the public API, imported by nothing inside the package
ENTRY_POINTS = {"cbs_convert", "cbs_convert.__main__", "cbs_convert.sample.__main__"}
MAX_LINES = 420  # "about 400": a room that grows past this holds two purposes
FAMILY_NAMES = ("sit", "dit", "adm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _own_imports(path: Path, modules):
    """(imported module, line, at top level) for every import of the package's own modules."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: relative import; the package imports absolutely"
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [name if name in modules else node.module for name in names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target and target.split(".")[0] == "cbs_convert":
                found.append((target, node.lineno, id(node) in top))
    return found


def _layer(module: str) -> int:
    first = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if first in names:
            return index
    raise AssertionError(f"{module} belongs to no layer of LAYERS: place it, and ARCHITECTURE.md with it")


def _graph():
    modules = _modules()
    return modules, {name: _own_imports(path, modules) for name, path in modules.items()}


def test_every_import_of_our_own_modules_sits_at_the_top_of_its_file():
    modules, graph = _graph()
    hidden = [f"{name} line {line}: imports {target} inside a function"
              for name, imports in graph.items() for target, line, top in imports if not top]
    assert hidden == []


def test_no_module_imports_a_layer_above_its_own():
    modules, graph = _graph()
    upward = [f"{name} -> {target}" for name, imports in graph.items() if name not in ENTRY_POINTS
              for target, _, _ in imports if _layer(target) > _layer(name)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    modules, graph = _graph()
    edges = {name: sorted({target for target, _, _ in imports if target != name}) for name, imports in graph.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in edges:
        if name not in state:
            visit(name, [name])


def test_no_room_is_longer_than_one_purpose_allows():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in long.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_only_families_name_an_architecture(name):
    """A family's name as a string outside families/ is a special case by model: the pipeline, storage
    and commands ask the family instead. bundled.py states which family our own teachers are."""
    pattern = re.compile(rf"""["']{name}["']""")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}" for module, path in _modules().items()
                 if not module.startswith("cbs_convert.families") and module != "cbs_convert.bundled"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_checks_themselves_can_fail(tmp_path):
    """The graph reader finds a hidden import and an upward arrow when there is one."""
    module = tmp_path / "probe.py"
    module.write_text("from cbs_convert.errors import UserError\n\ndef f():\n    from cbs_convert.cli.main import main\n")
    modules = {"cbs_convert.errors": None, "cbs_convert.cli.main": None}
    found = _own_imports(module, modules)
    assert [(target, top) for target, _, top in found] == [("cbs_convert.errors", True), ("cbs_convert.cli.main", False)]
    assert _layer("cbs_convert.cli.main") > _layer("cbs_convert.errors")
