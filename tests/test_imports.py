"""The import graph of minimoe/ points one way: no cycles, and no module imports from a higher layer.

Layers, lowest first (a module may import from its own layer or a lower one):
    1  backend, errors, config, presets                  arrays, errors, what a model IS
    2  ops.*, gradcheck, optim                           forward/backward pairs and their checks
    3  layers.*                                          the pieces of a block, built from ops
    4  model                                             the GPT, built from layers
    5  everything that uses a model (train, sample, checkpoint, data, hf, bench, ...)
    6  cli, commands, __main__, lessons.*                        the user's entry points
`minimoe/__init__.py` is the public facade and may import anything; nothing may import it back
(``from minimoe import x`` counts as importing the submodule x, not the facade).
Every import counts, module-level or inside a function: a function-level import is still an
edge of the graph, so it cannot be used to hide a cycle.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "minimoe"

LAYERS = [
    ("backend", "errors", "config", "presets"),
    ("ops", "gradcheck", "optim"),
    ("layers",),
    ("model",),
    None,  # layer 5: every module not named elsewhere
    ("cli", "commands", "__main__", "lessons"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict:
    """{dotted module name: path} of every .py file in the package."""
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(mod: str) -> int:
    """1-based layer of a dotted module name (minimoe.x.y -> by its first part x)."""
    first = mod.split(".")[1] if "." in mod else "__init__"
    default = None
    for i, names in enumerate(LAYERS, start=1):
        if names is None:
            default = i
        elif first in names:
            return i
    return default


def imports_of(mod: str, path: Path, modules: dict) -> set:
    """The minimoe modules that `mod` imports (resolving `from pkg import submodule`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "minimoe")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "minimoe":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    # importing minimoe.a.b also runs minimoe.a's __init__: count the deepest real module only
    return {m for m in found if m in modules and m != mod}


def graph() -> dict:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    for mod in all_modules():
        assert layer_of(mod) is not None, mod


def test_no_import_points_up_a_layer():
    bad = []
    for mod, deps in graph().items():
        if mod == "minimoe":
            continue  # the facade
        for dep in deps:
            if dep == "minimoe":
                bad.append(f"{mod} imports the facade `minimoe` (import the submodule instead)")
            elif layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "imports that point up the layers:\n  " + "\n  ".join(sorted(bad))


def find_cycle(g: dict):
    """One cycle of the directed graph g as a list of nodes, or None."""
    state = {}  # 1 = on the current path, 2 = done
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                cyc = visit(d)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def test_no_import_cycles():
    cyc = find_cycle(graph())
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


@pytest.mark.parametrize(
    "g, cyclic",
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)],
)
def test_cycle_finder_finds_cycles(g, cyclic):
    assert (find_cycle(g) is not None) == cyclic


def test_layer_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an ops module importing the model must be reported."""
    modules = {"minimoe.ops.x": tmp_path / "x.py", "minimoe.model": tmp_path / "model.py"}
    (tmp_path / "x.py").write_text("from minimoe.model import GPT\n")
    deps = imports_of("minimoe.ops.x", modules["minimoe.ops.x"], modules)
    assert deps == {"minimoe.model"} and layer_of("minimoe.model") > layer_of("minimoe.ops.x")
