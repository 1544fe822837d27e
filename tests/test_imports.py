"""Imports point one way (docs/design.md, "Layers").

Every module of ``src/difflab`` is read with ``ast`` -- imports inside functions (lazy ones)
included, since a lazy import is still a dependency -- and two graphs are built:

- between layers (``difflab.X``, X a top-level subpackage or module): every edge must go from
  a higher layer of ``LAYERS`` to a lower one, which also rules out cycles between layers;
- between modules: no cycle at all (a package's ``__init__`` re-exporting its submodules
  counts, a submodule that imports its own package's ``__init__`` closes a cycle).

Nothing is imported: the test reads the source, so it also sees imports that only run on
some code paths.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "difflab"

# difflab's layers, bottom to top: a module may import from its own layer and the layers
# listed before it, never from one listed after it.  Keep in step with docs/design.md.
LAYERS = [
    "difflab._version",  # the version string
    "difflab._validate",  # did-you-mean checks of closed choices and config keys
    "difflab._progress",  # the one progress bar
    "difflab.runs",  # run directories: config, weights files, the one atomic write
    "difflab.schedules",
    "difflab.parametrization",
    "difflab.diffusion",
    "difflab.formulations",
    "difflab.losses",
    "difflab.samplers",
    "difflab.models",
    "difflab.data",
    "difflab.interop",  # other tools' formats: key maps, SD readers, schedulers, A1111 text
    "difflab.images",
    "difflab.finetune",  # adapters (LoRA family, LyCORIS, textual inversion's word vectors)
    "difflab.pipeline",
    "difflab.prior",  # DreamBooth's prior images, drawn by a pipeline
    "difflab.eval",
    "difflab.metrics",  # alias of difflab.eval.metrics
    "difflab.train",
    "difflab.convert",  # whole runs to/from diffusers, single files, kohya, SD checkpoints
    "difflab.web",
    "difflab.cli",
    "difflab.__main__",
    "difflab",  # the facade: ``import difflab as dl``
]

# Layer edges that point upward today and are allowed until a named change removes them.
# Each entry: (importing module, imported module).  Empty: every layer edge points down.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(imported difflab module, line)`` for every import in ``path``, lazy ones included:
    the most specific module each import names (``from pkg import sub`` names ``pkg.sub``
    when that is a module, else ``pkg``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            names = subs if len(subs) == len(node.names) else [target, *subs]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # ``import difflab.x.y`` of a name in x
                name = name.rpartition(".")[0]
            if name.startswith("difflab") and name != module:
                yield name, node.lineno


EDGES = {mod: sorted(set(_imports(mod, path))) for mod, path in MODULES.items()}


def layer_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan): the
    shortest through the component's first node, followed by the component's other members
    (``[a, b, a, "(also: c, d)"]``) when it has more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:  # report one cycle per component; fixing it shows the next
                cycle = _one_cycle(graph, set(comp), min(comp))
                others = sorted(set(comp) - set(cycle))
                found.append(cycle + ([f"(also: {', '.join(others)})"] if others else []))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _one_cycle(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def _pairs(cycle: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(cycle, cycle[1:]) if not b.startswith("(also")]


def _where(a: str, b: str, same_layer: bool = False) -> str:
    """Where ``a`` imports ``b`` (modules) or, for layers, the first module edge between them."""
    for mod, targets in EDGES.items():
        for target, line in targets:
            if (mod, target) == (a, b) or (
                not same_layer and (layer_of(mod), layer_of(target)) == (a, b)
            ):
                return f"{MODULES[mod].relative_to(SRC.parent)}:{line} ({mod} -> {target})"
    return "?"


def test_every_layer_is_listed():
    layers = {layer_of(m) for m in MODULES}
    assert layers <= set(LAYERS), f"add to LAYERS (and docs/design.md): {layers - set(LAYERS)}"
    assert len(LAYERS) == len(set(LAYERS))


def test_lower_layers_never_import_higher_ones():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{layer_of(mod)} -> {layer_of(target)}: {MODULES[mod].relative_to(SRC.parent)}:{line}"
        for mod, targets in EDGES.items()
        for target, line in targets
        if rank[layer_of(target)] > rank[layer_of(mod)] and (mod, target) not in ALLOWED_UPWARD
    ]
    assert not upward, "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_no_cycle_between_layers():
    graph: dict[str, set[str]] = {}
    for mod, targets in EDGES.items():
        for target, _ in targets:
            if layer_of(target) != layer_of(mod):
                graph.setdefault(layer_of(mod), set()).add(layer_of(target))
    cycles = _cycles(graph)
    text = [
        " -> ".join(c) + "\n" + "\n".join(f"    {_where(a, b)}" for a, b in _pairs(c))
        for c in cycles
    ]
    assert not cycles, "import cycles between layers:\n" + "\n".join(text)


def test_no_cycle_between_modules():
    graph = {mod: {t for t, _ in targets} for mod, targets in EDGES.items()}
    cycles = _cycles(graph)
    text = [
        " -> ".join(c) + "\n" + "\n".join(f"    {_where(a, b, True)}" for a, b in _pairs(c))
        for c in cycles
    ]
    assert not cycles, "import cycles between modules:\n" + "\n".join(text)


def test_the_walk_sees_lazy_imports_and_cycles():
    """The walk itself: an import inside a function is an edge, and a cycle is reported."""
    assert any(t == "difflab._progress" for t, _ in EDGES["difflab.diffusion"])  # lazy
    assert any(t == "difflab.pipeline" for t, _ in EDGES["difflab.prior"])  # inside a function
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    graph["b"] |= {"a"}
    assert _cycles(graph) == [["a", "b", "a", "(also: c)"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
