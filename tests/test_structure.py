"""The import graph is a stack (STYLE.md "Layers"): each module imports only its own layer or those
below, the sharding mechanism knows no model, nothing imports the command line, there is no cycle,
and project modules are imported at module level (the command line aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (layer, modules) from the bottom up; a module may import its own layer or any below.
LAYERS: list[tuple[str, set[str]]] = [
    ("config", {"v4jax.errors", "v4jax.config", "v4jax.params"}),
    ("math", {"v4jax.quant", "v4jax.rope", "v4jax.norms", "v4jax.hyper_connections", "v4jax.linear",
              "v4jax.compressor", "v4jax.balancing", "v4jax.low_rank"}),
    ("sharding mechanism", {"v4jax.sharding", "v4jax.sharding.mesh", "v4jax.sharding.rules",
                            "v4jax.sharding.experts", "v4jax.sharding.kv", "v4jax.sharding.placement"}),
    # The indexer's top-k is the sequence-split one of the mechanism, so it sits above it.
    ("model", {"v4jax.indexer", "v4jax.attention", "v4jax.moe", "v4jax.cache", "v4jax.model", "v4jax.lora",
               "v4jax.indexer_loss"}),
    ("model on a mesh", {"v4jax.placement"}),
    ("checkpoints and loading", {"v4jax.checkpoint"}),
    ("runtime", {"v4jax.lora_export", "v4jax.tokens", "v4jax.sampling", "v4jax.speculative", "v4jax.generate", "v4jax.optim",
                 "v4jax.train", "v4jax.evaluate", "v4jax.data", "v4jax.runs", "v4jax.harness",
                 "v4jax.memory_plan"}),  # plans the training step of v4jax.train
    ("public API", {"v4jax"}),  # the package's __init__: re-exports from the layers below
    ("command line", {"v4jax.cli"}),
]

# Function-level imports of project modules that are not there to dodge a cycle.
LATE_IMPORTS_ALLOWED = {
    # `import v4jax` stays free of Orbax and tensorstore (seconds of import time) for model-only users.
    ("v4jax", "v4jax.checkpoint.loading"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "sharding":
        parts = ["v4jax", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    files = [*ROOT.joinpath("v4jax").rglob("*.py"), *ROOT.joinpath("sharding").rglob("*.py")]
    return {module_name(f): f for f in files}


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (name == m or (m != "v4jax" and name.startswith(m + "."))) and len(m) > depth:
                best, depth = i, len(m)
    if best is None:
        raise AssertionError(f"module {name} has no layer in tests/test_structure.py LAYERS")
    return best


def project_imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "v4jax")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                if base.split(".")[0] != "v4jax":
                    continue
                for a in child.names:  # `from v4jax import weights` imports the module v4jax.weights
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in known else base, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {name: project_imports(name, path) for name, path in modules().items()}


def test_every_module_imports_only_its_layer_or_below():
    bad = []
    for name, imports in graph().items():
        for target, _ in imports:
            if layer_of(target) > layer_of(name):
                bad.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not bad, "\n".join(bad)


def test_sharding_mechanism_knows_no_model_and_nothing_imports_the_cli():
    mechanism = LAYERS[2][1]
    for name, imports in graph().items():
        for target, _ in imports:
            if name in mechanism:
                assert layer_of(target) <= 2, f"{name} imports {target}"
            if not name.startswith("v4jax.cli"):
                assert not target.startswith("v4jax.cli"), f"{name} imports the command line ({target})"


def test_no_function_level_imports_of_project_modules_outside_the_cli():
    late = [(name, target) for name, imports in graph().items() if not name.startswith("v4jax.cli")
            for target, inner in imports if inner and (name, target) not in LATE_IMPORTS_ALLOWED]
    assert not late, late


def test_module_level_import_graph_has_no_cycle():
    edges = {name: {t for t, inner in imports if not inner and t != name} for name, imports in graph().items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    state: dict[str, int] = {}

    def walk(node, stack):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, node, nxt]))
            if state.get(nxt) is None:
                walk(nxt, [*stack, node])
        state[node] = 2

    for name in edges:
        if name not in state:
            walk(name, [])
