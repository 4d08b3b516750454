"""The real default model against transformers on the same GGUF: logits and greedy text."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.models import llama

torch = pytest.importorskip("torch")

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    if len(arr) <= 1:",
    "In 1969, Neil Armstrong became the first person to",
    "Les fleurs du printemps sont",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
# Logits may differ from transformers by at most this fraction of their range on a prompt.
RELATIVE_TOLERANCE = 1e-3


@pytest.mark.parametrize("text", PROMPTS)
def test_logits_match_transformers(smollm2, hf_smollm2, text):
    cfg, params, tokenizer = smollm2
    ids = tokenizer.encode(text)
    positions = jnp.arange(len(ids))[None]
    ours, _ = llama.forward(params, jnp.array([ids]), positions,
                            KVCache.init(cfg, 1, len(ids)), cfg)
    with torch.no_grad():
        theirs = hf_smollm2(torch.tensor([ids])).logits.numpy()
    max_abs = float(np.abs(np.asarray(ours) - theirs).max())
    logit_range = float(theirs.max() - theirs.min())
    print(f"{text[:30]!r}: {len(ids)} tokens, max |diff| {max_abs:.2e}, range {logit_range:.1f}")
    assert max_abs <= RELATIVE_TOLERANCE * logit_range
    assert (np.asarray(ours).argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_continuations_of_64_tokens_match_transformers_generate(smollm2, hf_smollm2):
    cfg, params, tokenizer = smollm2
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    # One batch of five prompts of different lengths, each compared with transformers alone;
    # no stop tokens on either side, so every row runs the full 64 tokens (past EOS too).
    ours = jaxinfer.generate(params, prompts, cfg, max_new_tokens=64)
    eos, hf_smollm2.generation_config.eos_token_id = hf_smollm2.generation_config.eos_token_id, None
    try:
        for ids, tokens in zip(prompts, ours.tokens, strict=True):
            with torch.no_grad():
                out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=64,
                                          do_sample=False, pad_token_id=tokenizer.eos_id)
            assert tokens == out[0, len(ids):].tolist()
    finally:
        hf_smollm2.generation_config.eos_token_id = eos
    assert ours.lengths == [64] * len(PROMPTS)
