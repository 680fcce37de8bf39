"""The package's layout (docs/design.md, Layout): layers that import only downward, no import circle, small modules,
a core that needs nothing but torch, and private state touched only by its own module. Read from the source alone."""

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_gb"
# Bottom first; a module may import from its own layer and the layers below it.
LAYERS = {"version": 0, "files": 0, "metrics": 0, "engine": 1, "io": 2, "training": 3, "compress": 4, "cli": 5,
          "__init__": 6, "_compat": 6}
# What each layer may import besides the standard library and hf_gb, at module level / anywhere.
THIRD_PARTY = {
    "engine": ({"torch"}, {"torch", "regex"}),
    "io": ({"torch"}, {"torch", "safetensors", "transformers", "accelerate", "huggingface_hub", "yaml"}),
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level) of every import in ``path`` (module ``name``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            found += [(t, id(node) in top) for t in targets]
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


MODULES = modules()


def hf_gb_imports(name: str) -> set[str]:
    out = set()
    for target, _ in imports(name, MODULES[name]):
        while target not in MODULES and "." in target:  # `from hf_gb.engine import kernels` names a module
            target = target.rsplit(".", 1)[0]
        if target.startswith("hf_gb") and target != name:
            out.add(target)
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_only_downward(name):
    for target in hf_gb_imports(name):
        assert LAYERS[layer(target)] <= LAYERS[layer(name)], f"{name} (layer {layer(name)}) imports {target}"


def test_no_import_circle():
    graph = {name: hf_gb_imports(name) - {"hf_gb"} for name in MODULES}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(node):], node]))
        if state.get(node) != 2:
            state[node] = 1
            for nxt in sorted(graph[node]):
                visit(nxt, [*trail, node])
            state[node] = 2

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) in THIRD_PARTY))
def test_lower_layers_import_only_torch_at_import_time(name):
    at_import, anywhere = THIRD_PARTY[layer(name)]
    for target, top in imports(name, MODULES[name]):
        root = target.split(".")[0]
        if root == "hf_gb" or root in sys.stdlib_module_names:
            continue
        where = "at module level" if top else "in a function"
        assert root in (at_import if top else anywhere), f"{name} imports {target} {where}"


def test_torch_distributed_only_in_the_shards_module():
    for name, path in MODULES.items():
        if layer(name) == "engine" and name != "hf_gb.engine.shards":
            assert "torch.distributed" not in path.read_text(), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_the_bottleneck_state_is_touched_only_by_its_module():
    private = re.compile(r"\b(gb|bottleneck)\._[a-z]")
    for name, path in MODULES.items():
        if name != "hf_gb.engine.bottleneck":
            hits = [line for line in path.read_text().splitlines() if private.search(line)]
            assert not hits, f"{name}: {hits}"


def test_every_subpackage_is_a_regular_package():
    """setup.cfg's ``packages = find:`` ships only folders with an ``__init__.py``."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert all((folder / "__init__.py").is_file() for folder in folders), sorted(map(str, folders))
