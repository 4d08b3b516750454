"""The package's layering (../shared/DESIGN.md): read every module's imports (lazy ones inside
functions included) and fail on an import cycle or an import from a lower layer to a higher.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jaxinfer

PACKAGE = Path(jaxinfer.__file__).parent

# Bottom up. A module belongs to the layer of its longest listed prefix.
LAYERS = [
    ("configuration", ["jaxinfer.config", "jaxinfer.progress"]),  # progress: stderr display
    ("hardware", ["jaxinfer.sharding", "jaxinfer.doctor"]),
    # The quantized products the models call are kernels; the quantizers are weights.
    ("kernels", ["jaxinfer.pallas", "jaxinfer.kernels", "jaxinfer.quant.qarray",
                 "jaxinfer.quant.cpu_kernels"]),
    ("model execution", ["jaxinfer.models", "jaxinfer.cache", "jaxinfer.sampling",
                         "jaxinfer.decode", "jaxinfer.runtime", "jaxinfer.generate",
                         "jaxinfer.evaluate", "jaxinfer.tokenizer", "jaxinfer.watermark",
                         "jaxinfer.speculative", "jaxinfer.draft_heads"]),
    ("weights", ["jaxinfer.checkpoints", "jaxinfer.quant"]),
    ("serving", ["jaxinfer.serving"]),
    ("interface", ["jaxinfer.__init__", "jaxinfer.api", "jaxinfer.launch", "jaxinfer.bench",
                   "jaxinfer.distill"]),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("jaxinfer", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts)
        names[name.removesuffix(".__init__") if parts[-1] == "__init__" and len(parts) > 2
              else name] = path
    return names


def imports() -> dict[str, set[str]]:
    """module -> the jaxinfer modules it imports (anywhere in its body)."""
    names = module_names()
    resolved = {n.removesuffix(".__init__"): n for n in names}

    def module_of(name: str) -> str:
        while name not in resolved:
            name = name.rpartition(".")[0]
        return resolved[name]

    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {module_of(a.name) for a in node.names if a.name.startswith("jaxinfer")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxinfer"):
                for alias in node.names:  # `from jaxinfer.x import y`: module y, or x's name y
                    full = f"{node.module}.{alias.name}"
                    found.add(module_of(full if full in resolved else node.module))
        graph[name] = found - {name}
    return graph


def layer_of(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(imports()) is None


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(imports().items()) for b in sorted(targets)
              if layer_of(b) > layer_of(a)]
    assert upward == []


def test_config_names_the_attention_implementations_the_kernels_have():
    from jaxinfer import config, pallas

    assert config.ATTENTION_IMPLS == pallas.IMPLEMENTATIONS
