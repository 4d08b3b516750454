"""The long-document recipe (examples/long_document.py) on the real SmolLM2, its context cut
to 256 tokens so that a short text is "longer than the context": every call fits, the
segments cover the document in order, and each call carries the previous summary."""

from __future__ import annotations

import dataclasses

import jaxinfer
from examples.long_document import summarize_long_document

TEXT = " ".join(
    f"Day {day}: the expedition walked {3 + day % 5} miles north and counted {day * 7} birds."
    for day in range(1, 21)
)


def test_a_document_longer_than_the_context_is_summarized_segment_by_segment(smollm2):
    cfg = dataclasses.replace(smollm2.config, max_seq_len=256)
    model = jaxinfer.Model(cfg, smollm2.params, smollm2.tokenizer)
    tokenizer = model.tokenizer
    document = tokenizer.encode(TEXT, add_bos=False)
    assert len(document) > cfg.max_seq_len  # too long for one call

    prompts = []

    def ask(messages):  # the public API, recording what each call was asked
        prompts.append(messages[0]["content"])
        return jaxinfer.chat(model, messages, max_new_tokens=16)[0]

    summary, steps = summarize_long_document(model, TEXT, summary_tokens=16, ask=ask)
    assert len(steps) >= 3 and summary == steps[-1].summary and summary
    assert all(step.prompt_tokens + 16 <= cfg.max_seq_len for step in steps)
    # The segments are the document, in order, nothing dropped.
    rejoined = [t for step in steps for t in tokenizer.encode(step.segment, add_bos=False)]
    assert tokenizer.decode(rejoined) == tokenizer.decode(document)
    for before, prompt in zip(steps, prompts[1:], strict=False):  # each carries the last summary
        assert before.summary in prompt
