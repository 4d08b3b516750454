"""One function per engine: load the model, then time the same workloads on it.

Every runner returns the same fields (seconds, tokens/s keyed by length or batch size):
load_s, compile_s (jaxinfer only, else None), ttft_cold_s (the first request, any compiling
included), ttft_s (best of repeats), prefill_tok_s {tokens: rate}, decode_tok_s {batch: rate},
param_bytes. Decode tok/s counts the tokens after each row's first (which prefill makes)
over the decoding time alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from jaxinfer.bench.workload import Workload, best_of, log, wall


def run_jaxinfer(w: Workload, quant: str | None, dtype: str) -> dict:
    import jax

    import jaxinfer
    from jaxinfer.generate import enable_compilation_cache
    from jaxinfer.quant import active_param_bytes, param_bytes

    label = f"jaxinfer {quant or 'none'}/{dtype}"
    # An empty compilation cache, so compile_s is what a first start costs.
    enable_compilation_cache(tempfile.mkdtemp(prefix="jaxinfer-bench-xla-"))
    log(label, "loading")
    start = time.perf_counter()
    model = jaxinfer.load_model(w.model, dtype=dtype, quant=quant, progress=False)
    jax.block_until_ready(model.params)
    cfg = model.config
    out: dict = {"load_s": time.perf_counter() - start, "param_bytes": param_bytes(model.params),
                 "active_param_bytes": active_param_bytes(model.params, cfg.experts_per_token,
                                                          cfg.n_experts)}
    compile_s = 0.0

    def generate(prompts: list[list[int]], max_new: int) -> jaxinfer.GenerateResult:
        nonlocal compile_s
        result = jaxinfer.generate(model.params, prompts, model.config, max_new_tokens=max_new)
        compile_s += result.timings["compile"]
        return result

    prompt = [list(w.prompt_ids)]
    log(label, f"time to first token, prompt {len(w.prompt_ids)} tokens (compiles)")
    out["ttft_cold_s"] = wall(lambda: generate(prompt, 1))
    out["ttft_s"] = best_of(lambda: wall(lambda: generate(prompt, 1)), w.repeats)
    out["prefill_tok_s"] = {}
    for n in w.prefill_tokens:
        log(label, f"prefill {n} tokens")
        ids = [w.random_prompt(n)]
        generate(ids, 1)  # compiles this length's bucket
        seconds = best_of(lambda ids=ids: generate(ids, 1).timings["prefill"], w.repeats)
        out["prefill_tok_s"][n] = n / seconds
    out["decode_tok_s"] = {}
    for batch in w.batch_sizes:
        log(label, f"decode batch {batch}, {w.decode_tokens} new tokens per row")
        rows = prompt * batch
        steps = sum(generate(rows, w.decode_tokens).lengths) - batch  # warm-up compiles
        seconds = best_of(lambda rows=rows: generate(rows, w.decode_tokens).timings["decode"],
                          w.repeats)
        out["decode_tok_s"][batch] = steps / seconds
    out["compile_s"] = compile_s
    return out


def run_transformers(w: Workload) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    label = "transformers"
    torch.set_num_threads(w.threads)
    path = Path(w.model)
    log(label, "loading" + (" (dequantizing the GGUF to fp32)" if path.suffix == ".gguf" else ""))
    start = time.perf_counter()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    out: dict = {"load_s": time.perf_counter() - start, "compile_s": None,
                 "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    def forward(ids: list[list[int]]) -> float:
        # Logits for the last position only, as generate() computes them.
        return wall(lambda: model(torch.tensor(ids), logits_to_keep=1))

    def generate(ids: list[list[int]], max_new: int) -> float:
        ids = torch.tensor(ids)
        return wall(lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
            min_new_tokens=max_new, pad_token_id=0, temperature=None, top_p=None, top_k=None))

    with torch.inference_mode():
        prompt = [list(w.prompt_ids)]
        log(label, f"time to first token, prompt {len(w.prompt_ids)} tokens")
        out["ttft_cold_s"] = generate(prompt, 1)
        out["ttft_s"] = best_of(lambda: generate(prompt, 1), w.repeats)
        out["prefill_tok_s"] = {}
        for n in w.prefill_tokens:
            log(label, f"prefill {n} tokens")
            ids = [w.random_prompt(n)]
            forward(ids)
            out["prefill_tok_s"][n] = n / best_of(lambda ids=ids: forward(ids), w.repeats)
        out["decode_tok_s"] = {}
        for batch in w.batch_sizes:
            log(label, f"decode batch {batch}, {w.decode_tokens} new tokens per row")
            rows = prompt * batch
            generate(rows, w.decode_tokens)
            prefill = best_of(lambda rows=rows: forward(rows), w.repeats)
            total = best_of(lambda rows=rows: generate(rows, w.decode_tokens), w.repeats)
            out["decode_tok_s"][batch] = batch * (w.decode_tokens - 1) / max(total - prefill,
                                                                             1e-9)
    return out


def run_llama_cpp(w: Workload) -> dict:
    """llama.cpp through llama-cpp-python's C API: prompts in one llama_decode batch, then one
    batch per step holding every row's newest token (one sequence per row), greedy argmax."""
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import _logger

    label = "llama.cpp"
    _logger.set_verbose(False)
    lc.llama_backend_init()
    log(label, "loading")
    start = time.perf_counter()
    model = lc.llama_model_load_from_file(w.model.encode(), lc.llama_model_default_params())
    if not model:
        raise ValueError(f"llama.cpp could not load {w.model}")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    out: dict = {"load_s": time.perf_counter() - start, "compile_s": None,
                 "param_bytes": int(lc.llama_model_size(model))}

    def context(rows: int, tokens_per_row: int, batch_tokens: int):
        params = lc.llama_context_default_params()
        per_row = -(-tokens_per_row // 256) * 256
        params.n_ctx = rows * per_row
        params.n_batch = max(batch_tokens, rows)
        params.n_seq_max = rows
        params.n_threads = params.n_threads_batch = w.threads
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            raise ValueError(f"llama.cpp could not make a context for {rows} rows of "
                             f"{tokens_per_row} tokens")
        return ctx

    def step(ctx, batch, entries: list[tuple[int, int, int]]) -> np.ndarray:
        """Decodes (token, position, row) entries, the last of each row asking for logits;
        returns the greedy next token of every row that asked."""
        last = {row: i for i, (_, _, row) in enumerate(entries)}
        batch.n_tokens = len(entries)
        for i, (token, pos, row) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = row
            batch.logits[i] = last[row] == i
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on a batch of {len(entries)} tokens")
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(last), n_vocab))
        return logits.argmax(axis=-1)

    def prompt_entries(prompt: list[int], rows: int) -> list[tuple[int, int, int]]:
        return [(t, pos, row) for row in range(rows) for pos, t in enumerate(prompt)]

    def prefill_seconds(ctx, batch, prompt: list[int]) -> float:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        return wall(lambda: step(ctx, batch, prompt_entries(prompt, 1)))

    def timed(prompt: list[int], extra: int, fn):
        ctx = context(1, len(prompt) + extra, len(prompt))
        batch = lc.llama_batch_init(len(prompt), 0, 1)
        try:
            return fn(ctx, batch)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    prompt = list(w.prompt_ids)
    log(label, f"time to first token, prompt {len(prompt)} tokens")

    def ttft(ctx, batch):
        cold = prefill_seconds(ctx, batch, prompt)
        return cold, best_of(lambda: prefill_seconds(ctx, batch, prompt), w.repeats)

    out["ttft_cold_s"], out["ttft_s"] = timed(prompt, 1, ttft)
    out["prefill_tok_s"] = {}
    for n in w.prefill_tokens:
        log(label, f"prefill {n} tokens")
        ids = w.random_prompt(n)

        def prefill(ctx, batch, ids=ids):
            prefill_seconds(ctx, batch, ids)
            return best_of(lambda: prefill_seconds(ctx, batch, ids), w.repeats)

        out["prefill_tok_s"][n] = n / timed(ids, 1, prefill)
    out["decode_tok_s"] = {}
    for rows in w.batch_sizes:
        log(label, f"decode batch {rows}, {w.decode_tokens} new tokens per row")
        ctx = context(rows, len(prompt) + w.decode_tokens, rows * len(prompt))
        batch = lc.llama_batch_init(rows * len(prompt), 0, 1)

        def decode(ctx=ctx, batch=batch, rows=rows) -> float:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            tokens = step(ctx, batch, prompt_entries(prompt, rows))
            start = time.perf_counter()
            for pos in range(len(prompt), len(prompt) + w.decode_tokens - 1):
                tokens = step(ctx, batch, [(int(t), pos, row) for row, t in enumerate(tokens)])
            return time.perf_counter() - start

        try:
            decode()
            seconds = best_of(decode, w.repeats)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        out["decode_tok_s"][rows] = rows * (w.decode_tokens - 1) / seconds
    lc.llama_model_free(model)
    return out
