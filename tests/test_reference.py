"""The real default model against transformers on the same GGUF: logits and greedy text."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.models import llama
from tests.numerics import assert_logits_close, assert_top1_agrees_where_decisive

torch = pytest.importorskip("torch")

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    if len(arr) <= 1:",
    "In 1969, Neil Armstrong became the first person to",
    "Les fleurs du printemps sont",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
# Logits may differ from transformers by at most this fraction of their range on a sequence
# (measured: at most 3e-6, i.e. 1.6e-4 of a range of 47, natively and under
# --xla_cpu_max_isa=AVX); every one of the 5 x 64 greedy tokens then has a margin above 2x it.
RELATIVE_TOLERANCE = 3e-5
pytestmark = pytest.mark.numerics


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
    assert_top1_agrees_where_decisive(ours, theirs, RELATIVE_TOLERANCE * logit_range)


def test_greedy_continuations_of_64_tokens_match_transformers_generate(smollm2, hf_smollm2):
    """Our 64-token greedy continuations (five prompts of different lengths in one batch, no
    stop tokens), each fed back after its prompt to both models in one forward: the logits stay
    within the tolerance, and each of our tokens is transformers' greedy choice after the same
    prefix wherever that choice is decisive (top-2 margin over twice the tolerance). Where it
    is not, a greedy run on either side may take the other token, on any machine."""
    cfg, params, tokenizer = smollm2
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    ours = jaxinfer.generate(params, prompts, cfg, max_new_tokens=64)
    assert ours.lengths == [64] * len(PROMPTS)
    for ids, tokens in zip(prompts, ours.tokens, strict=True):
        sequence = ids + tokens[:-1]  # the logits at position i chose token i + 1
        logits, _ = llama.forward(params, jnp.array([sequence]), jnp.arange(len(sequence))[None],
                                  KVCache.init(cfg, 1, len(sequence)), cfg)
        with torch.no_grad():
            theirs = hf_smollm2(torch.tensor([sequence])).logits.numpy()[0, len(ids) - 1:]
        atol = RELATIVE_TOLERANCE * float(np.ptp(theirs))
        worst = assert_logits_close(np.asarray(logits)[0, len(ids) - 1:], theirs, atol)
        checked = assert_top1_agrees_where_decisive(np.array(tokens), theirs, atol)
        print(f"{len(ids)}-token prompt: max |diff| {worst:.2e} (tolerance {atol:.2e}), "
              f"{checked:.0%} of the 64 tokens decisive")
