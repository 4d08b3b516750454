"""Distillation of draft heads (jaxinfer.draft_heads) from the model they draft for.

Sequence-level distillation (Kim & Rush 2016), as Medusa-2's self-distillation: the model
answers prompts from a text file, and the heads learn to predict its own continuations. Each
training example is a position p of an answer: head i reads the hidden state u_p (which
drew token x_{p+1}) and x_{p+1}'s embedding, and is trained toward the model's distribution
of token x_{p+2+i}, i.e. its softmax at position p + 1 + i, kept as its top `top_k_targets`
probabilities (renormalized): a cross-entropy to them is the KL divergence up to a constant.
The model itself stays frozen; only the heads' weights are trained, with optax's AdamW.

    data = make_dataset(model, prompts, options)       # generate, then one forward pass
    heads = train(model, data, options, "out/")        # resumable: Orbax checkpoints in out/

`python -m jaxinfer.launch.distill` runs both and saves the heads (checkpoints.draft).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import draft_heads
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import Model
from jaxinfer.generate import generate
from jaxinfer.models import family
from jaxinfer.runtime import bucket
from jaxinfer.sampling import SamplingParams

TRAIN_DIR = "train"  # Orbax CheckpointManager steps (heads + optimizer state) under the output


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    num_heads: int = 4
    hidden_dim: int | None = None  # the heads' inner width (None: the model's embed_dim)
    max_new_tokens: int = 128  # per answer generated for the data
    temperature: float = 0.0  # of those answers (0: greedy, what greedy serving drafts for)
    generate_batch: int = 16  # prompts per generate() call
    top_k_targets: int = 32  # target probabilities kept per position
    steps: int = 600
    batch_size: int = 256  # examples per optimizer step
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    checkpoint_every: int = 100
    seed: int = 0


@dataclasses.dataclass
class Dataset:
    """Training positions of the model's answers (P positions; arrays on the host).

    hidden [P + 1 per answer, embed] float32: final hidden states of the answers' positions,
    from each prompt's last one on; next_token [...] int32: the token each drew (-1 at an
    answer's end); target_ids / target_probs [..., top_k]: the model's top probabilities
    there; examples [E] int: rows of `hidden` that train the heads (their next token known);
    heldout: which examples belong to the last tenth of the answers (for `evaluate`).
    """

    hidden: np.ndarray
    next_token: np.ndarray
    target_ids: np.ndarray
    target_probs: np.ndarray
    examples: np.ndarray
    heldout: np.ndarray
    answer_end: np.ndarray  # [E]: the row past each example's answer (targets stop there)

    def save(self, path: Path) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> Dataset:
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Prompt texts -> token ids, through the chat template as user messages if `chat`."""
    encoded = []
    for text in texts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True)
        encoded.append(tokenizer.encode(text, add_bos=not chat))
    return encoded


def make_dataset(model: Model, encoded: Sequence[Sequence[int]], options: DistillOptions,
                 stop_ids: Sequence[int] = (), progress: bool = True) -> Dataset:
    """Generates the model's answers to the prompts `encoded` (token ids; encode_prompts),
    then runs each prompt + answer through the model once for its hidden states and top
    target probabilities."""
    cfg = model.config
    encoded = [list(p) for p in encoded]
    sampling = SamplingParams(temperature=options.temperature, seed=options.seed)
    sequences, start = [], time.perf_counter()
    for i in range(0, len(encoded), options.generate_batch):
        batch = encoded[i: i + options.generate_batch]
        result = generate(model.params, batch, cfg, max_new_tokens=options.max_new_tokens,
                          sampling=sampling, stop_token_ids=stop_ids)
        sequences += [(p, p + t) for p, t in zip(batch, result.tokens, strict=True)]
        _progress(progress, "generating answers", len(sequences), len(encoded), start)

    parts: dict[str, list] = {"hidden": [], "next_token": [], "ids": [], "probs": []}
    examples, heldout, answer_end, rows = [], [], [], 0
    start = time.perf_counter()
    for i in range(0, len(sequences), TARGET_BATCH):
        batch = sequences[i: i + TARGET_BATCH]
        hidden, ids, probs = _targets(model.params, [s for _, s in batch], cfg=cfg,
                                      top_k=options.top_k_targets)
        for j, (prompt, sequence) in enumerate(batch):
            first = len(prompt) - 1  # the prompt's last position drew the answer's first token
            count = len(sequence) - first
            parts["hidden"].append(hidden[j, first: len(sequence)])
            parts["ids"].append(ids[j, first: len(sequence)])
            parts["probs"].append(probs[j, first: len(sequence)])
            parts["next_token"].append(np.append(sequence[first + 1:], -1).astype(np.int32))
            examples += range(rows, rows + count - 1)
            heldout += [i + j >= len(sequences) * 9 // 10] * (count - 1)
            answer_end += [rows + count] * (count - 1)
            rows += count
        _progress(progress, "hidden states", i + len(batch), len(sequences), start)
    return Dataset(hidden=np.concatenate(parts["hidden"]),
                   next_token=np.concatenate(parts["next_token"]),
                   target_ids=np.concatenate(parts["ids"]),
                   target_probs=np.concatenate(parts["probs"]),
                   examples=np.asarray(examples, np.int64), heldout=np.asarray(heldout),
                   answer_end=np.asarray(answer_end, np.int64))


def _targets_impl(params, tokens, *, cfg, top_k):
    """tokens [rows, seq] -> final hidden states [rows, seq, embed] float32 and the model's
    top-k next token ids and probabilities (renormalized over the k) at each position."""
    model = family(cfg.architecture)
    rows, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    hidden, _ = model.transformer(params, tokens, positions, KVCache.init(cfg, rows, seq), cfg)
    top, ids = jax.lax.top_k(model.unembed(params, hidden, cfg), top_k)
    return hidden.astype(jnp.float32), ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


_targets_jit = jax.jit(_targets_impl, static_argnames=("cfg", "top_k"))
TARGET_BATCH = 4  # sequences per forward pass for the targets ([4, seq, vocab] logits)


def _targets(params, sequences: list[list[int]], *, cfg, top_k):
    """_targets_impl over `sequences`, padded to one bucket; numpy arrays [rows, seq, ...]."""
    padded = np.zeros((TARGET_BATCH, bucket(max(map(len, sequences)), 16)), np.int32)
    for i, sequence in enumerate(sequences):
        padded[i, : len(sequence)] = sequence
    return tuple(map(np.asarray, _targets_jit(params, padded, cfg=cfg, top_k=top_k)))


def readout(params, cfg):
    """The model's unembedding as a differentiable function z [..., embed] -> fp32 logits,
    from float weights (quantized products have no gradient)."""
    model = family(cfg.architecture)
    cfg = dataclasses.replace(cfg, cpu_kernels="off")
    return lambda z: model.unembed(params, z.astype(cfg.dtype), cfg)


def loss_fn(heads, batch: dict, params, cfg) -> jax.Array:
    """Mean over examples and heads of the cross-entropy from the model's top-k target
    probabilities to each head's distribution (masked past an answer's end)."""
    embedding = family(cfg.architecture).embed(params, batch["next_token"][:, None], cfg)[:, 0]
    z = draft_heads.hidden_states(heads, batch["hidden"], embedding)  # [rows, heads, embed]
    logprobs = jax.nn.log_softmax(readout(params, cfg)(z), axis=-1)
    picked = jnp.take_along_axis(logprobs, batch["target_ids"], axis=-1)  # [rows, heads, k]
    per_head = -jnp.sum(batch["target_probs"] * picked, axis=-1)
    return jnp.sum(per_head * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1)


def batch_of(data: Dataset, examples: np.ndarray, num_heads: int) -> dict:
    """The arrays `loss_fn` reads for these examples (rows of data.hidden)."""
    target = examples[:, None] + 1 + np.arange(num_heads)[None]  # head i: position p + 1 + i
    mask = target < data.answer_end[np.searchsorted(data.examples, examples)][:, None]
    target = np.where(mask, target, examples[:, None])
    return {"hidden": data.hidden[examples], "next_token": data.next_token[examples],
            "target_ids": data.target_ids[target], "target_probs": data.target_probs[target],
            "mask": mask.astype(np.float32)}


def train(model: Model, data: Dataset, options: DistillOptions, output: Path,
          progress: bool = True) -> draft_heads.Heads:
    """Trains heads on `data`, checkpointing heads and optimizer state every
    `checkpoint_every` steps under output/train; a run restarted on the same output resumes
    from the latest checkpoint. Returns the trained heads."""
    import optax
    import orbax.checkpoint as ocp

    cfg, params = model.config, model.params
    if options.steps < 1:
        raise ValueError(f"steps={options.steps}; it must be >= 1")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, options.learning_rate, min(options.warmup_steps, options.steps - 1), options.steps)
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    heads = draft_heads.init(jax.random.key(options.seed), cfg.embed_dim, options.num_heads,
                             options.hidden_dim)
    state = {"heads": heads, "opt_state": optimizer.init(heads)}
    manager = ocp.CheckpointManager(Path(output).absolute() / TRAIN_DIR,
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    first = 0
    if (latest := manager.latest_step()) is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        first = latest
        if progress:
            print(f"resuming from step {latest}", file=sys.stderr)

    @jax.jit
    def update(state, batch, params):  # params as an argument: not folded into the program
        loss, grads = jax.value_and_grad(loss_fn)(state["heads"], batch, params, cfg)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["heads"])
        return {"heads": optax.apply_updates(state["heads"], updates),
                "opt_state": opt_state}, loss

    pool = data.examples[~data.heldout]
    start, losses = time.perf_counter(), []
    for step in range(first, options.steps):
        rng = np.random.default_rng((options.seed, step))  # resumes draw the same batches
        examples = np.sort(rng.choice(pool, min(options.batch_size, len(pool)), replace=False))
        state, loss = update(state, batch_of(data, examples, options.num_heads), params)
        losses.append(float(loss))
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
        _progress(progress, "training", step + 1, options.steps, start,
                  f", loss {np.mean(losses[-20:]):.3f}")
    manager.wait_until_finished()
    manager.close()
    return state["heads"]


def evaluate(model: Model, heads, data: Dataset, batch_size: int = 512) -> np.ndarray:
    """Per head, how often its greedy proposal is the model's own greedy next-but-i token on
    the held-out answers, given all earlier proposals right: the acceptance rate of draft
    position i under greedy decoding (a draft is accepted only after all before it)."""
    cfg, params = model.config, model.params
    examples = data.examples[data.heldout]
    n = draft_heads.num_heads(heads)
    right, total = np.zeros(n), 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = batch_of(data, chunk, n)
        proposal = np.asarray(draft_heads.propose(heads, params, batch["hidden"],
                                                  batch["next_token"], n, cfg))
        target = batch["target_ids"][..., 0]  # the model's greedy token
        hit = (proposal == target) & (batch["mask"] > 0)
        right += np.cumprod(hit, axis=1).sum(axis=0)
        total += len(chunk)
    return right / max(total, 1)


def _progress(show: bool, what: str, done: int, total: int, start: float, extra: str = ""):
    if show and (done % max(total // 100, 1) == 0 or done == total):
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total} ({time.perf_counter() - start:.0f}s{extra})", end=end,
              file=sys.stderr, flush=True)
