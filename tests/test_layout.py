"""The import layering the developers' guide sets, checked on the source: imports flow one way,
``config`` -> ``rope``/``cache`` -> ``kernels`` -> ``attention`` -> ``model`` -> ``train``/
``interop`` -> ``loading``/``convert`` -> ``bench``/``compare`` -> ``cli``. Lazy imports inside functions
count too: a cycle hidden in a function body is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "latentattn"

# Each unit (a top-level module or subpackage of latentattn) and its layer; a unit may import
# only units of a lower layer, or of its own layer when no cycle results.
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1, "io": 1, "data": 1, "precision": 1, "timing": 1,
    "config_io": 2, "presets": 2, "tokenizer": 2, "rope": 2, "cache": 2, "calc": 2,
    "kernels": 3,
    "attention": 4,
    "model": 5,
    "train": 6, "interop": 6, "perplexity": 6,
    "loading": 7, "convert": 7,
    "bench": 8, "compare": 8,
    "cli": 9, "__main__": 9,
}
ROOT = "__init__"  # the package root re-exports the public API: it may import anything


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "latentattn":
                continue
            if len(parts) == 1 or not ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
                units.add(ROOT)  # `import latentattn` or `from latentattn import name`
            else:
                units.add(parts[1])
    return units


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = unit_of(path)
        edges.setdefault(unit, set()).update(imported_units(path) - {unit})
    return edges


def test_every_unit_has_a_layer() -> None:
    units = set(graph()) - {ROOT}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("unit", sorted(LAYERS))
def test_imports_flow_down(unit: str) -> None:
    up = sorted(u for u in graph().get(unit, set()) if u != ROOT and LAYERS.get(u, 99) > LAYERS[unit])
    assert not up, f"latentattn.{unit} (layer {LAYERS[unit]}) imports from above: {up}"


def test_only_the_cli_imports_the_package_root() -> None:
    # The root imports most of the package; a module below it importing it back is a cycle.
    users = sorted(u for u, vs in graph().items() if ROOT in vs and u not in (ROOT, "cli"))
    assert not users, f"these import the latentattn package root: {users}"


def test_no_cycles_between_units() -> None:
    edges = {u: {v for v in vs if v != ROOT} for u, vs in graph().items() if u != ROOT}
    done: set[str] = set()

    def visit(u: str, path: list[str]) -> None:
        if u in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(u):], u]))
        if u in done:
            return
        for v in sorted(edges.get(u, ())):
            visit(v, [*path, u])
        done.add(u)

    for u in sorted(edges):
        visit(u, [])


def test_cli_loads_models_only_through_load() -> None:
    # "latentattn.load is the only loading path in the CLI": no command builds or reads
    # a model on its own.
    banned = ("Transformer(", "from_pretrained", "load_checkpoint_tensors", "get_preset(",
              "config_from_hf", "HFTokenizer(")
    for path in (SRC / "cli").glob("*.py"):
        text = path.read_text()
        found = [b for b in banned if b in text]
        assert not found, f"{path.name} loads a model itself ({', '.join(found)}): use latentattn.load"
