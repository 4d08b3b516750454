"""Recipe: answer over a document longer than the model's context, on the public API only.

Prompts up to the model's whole context go straight to `jaxinfer.chat` / `generate` or to
the server (which prefills them in chunks of --max_num_batched_tokens). For a longer
document, split it into segments that fit beside the instruction, and carry forward what
earlier segments said: each call sees the running summary of everything before plus one new
segment, and returns the updated summary, which is the merged result at the end.

    import jaxinfer
    from examples.long_document import summarize_long_document

    model = jaxinfer.load_model("smollm2-135m-instruct")
    summary, steps = summarize_long_document(model, open("report.txt").read())

Against the OpenAI-compatible server, pass `ask` (any function from chat messages to the
answer text), e.g. with the `openai` client:

    ask = lambda messages: client.chat.completions.create(
        model=name, messages=messages, max_tokens=128, temperature=0).choices[0].message.content
    summary, steps = summarize_long_document(model, text, ask=ask)

A server with prefix caching on reuses the instruction's pages across the calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jaxinfer

INSTRUCTION = ("Summary of the document so far:\n{summary}\n\nNext part of the document:\n"
               "{segment}\n\nRewrite the summary so that it also covers this part.")


@dataclasses.dataclass
class Step:
    """One segment's call: the segment's text, its prompt length, and the summary after it."""

    segment: str
    prompt_tokens: int
    summary: str


def segment_budget(model: jaxinfer.Model, summary_tokens: int) -> int:
    """Document tokens per segment: the context less the templated instruction (with an
    empty segment), room for a carried summary, and the answer."""
    tokenizer = model.tokenizer
    empty = [{"role": "user", "content": INSTRUCTION.format(summary="", segment="")}]
    overhead = len(tokenizer.encode(tokenizer.apply_chat_template(
        empty, add_generation_prompt=True), add_bos=False))
    budget = model.config.max_seq_len - overhead - 2 * summary_tokens - 8  # 8: re-tokenizing
    if budget < 16:
        raise ValueError(f"the context ({model.config.max_seq_len} tokens) leaves {budget} "
                         f"tokens per segment beside the instruction ({overhead} tokens) and "
                         f"summary_tokens={summary_tokens}; lower summary_tokens")
    return budget


def summarize_long_document(model: jaxinfer.Model, text: str, *, summary_tokens: int = 128,
                            ask: Callable[[list[dict]], str] | None = None
                            ) -> tuple[str, list[Step]]:
    """The summary of `text` (any length) and every segment's step, in order."""
    tokenizer = model.tokenizer
    ids = tokenizer.encode(text, add_bos=False)
    per_segment = segment_budget(model, summary_tokens)
    ask = ask or (lambda messages: jaxinfer.chat(model, messages,
                                                 max_new_tokens=summary_tokens)[0])
    summary, steps = "", []
    for start in range(0, len(ids), per_segment):
        segment = tokenizer.decode(ids[start : start + per_segment])
        messages = [{"role": "user",
                     "content": INSTRUCTION.format(summary=summary or "(none yet)",
                                                   segment=segment)}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        summary = ask(messages).strip()
        steps.append(Step(segment, len(tokenizer.encode(prompt, add_bos=False)), summary))
    return summary, steps
