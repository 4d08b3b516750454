"""Model families, looked up by the `architecture` field of a ModelConfig.

Every family so far is the one decoder in `llama.py`, its quirks set by ModelConfig fields;
mixtures of experts swap its MLP for `moe.py`'s.
"""

from __future__ import annotations

from types import ModuleType

from jaxinfer.models import llama
from jaxinfer.sharding import rules

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "qwen3": llama,
    "gemma3": llama,
    "mixtral": llama,  # mixtures of experts: the same decoder with models/moe.py's MLP
    "qwen3_moe": llama,
    "gpt_oss": llama,
}
for _name, _module in FAMILIES.items():  # shardings are derived from each declaration
    rules.register_family(_name, _module)


def family(architecture: str) -> ModuleType:
    """The module implementing `architecture` (forward, init_params, abstract_params, ...)."""
    if architecture not in FAMILIES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[architecture]
