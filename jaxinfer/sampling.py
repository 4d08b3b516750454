"""Token sampling with per-row parameters: greedy, temperature, top-k, top-p, min-p, and the
logit adjustments before them (penalties, logit bias, the green-list watermark, min_tokens);
logprobs of the raw logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import watermark

MAX_LOGIT_BIAS = 300  # entries of logit_bias per request (OpenAI's documented limit)
MAX_TOP_LOGPROBS = 20  # top logprobs per token, as OpenAI allows (0..20)
NO_LOGPROBS = -1  # SamplingArrays.logprobs of a row that asked for none


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature=0 is greedy; top_k=0 and top_p=1 are off.

    Penalties follow vLLM / OpenAI: `presence_penalty` is subtracted from the logit of every
    token generated at least once, `frequency_penalty` times the number of times it was
    generated; `repetition_penalty` (CTRL's) divides positive logits and multiplies negative
    ones of every token in the prompt or the output. `logit_bias` ((token id, bias) pairs) is
    added to the logits. For the first `min_tokens` tokens the stop ids cannot be drawn.
    `ignore_eos`: the tokenizer's stop ids do not end the row (stop ids a request names still
    do in the server; generate() then ignores its `stop_token_ids` for this row).
    `logprobs`: None, or how many top logprobs (0..20) to return beside each chosen token's.
    `watermark_key`: None, or the secret whose green-list watermark (jaxinfer.watermark) the
    row's tokens carry; never printed (repr=False).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    watermark_key: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
            (0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 2,
             f"repetition_penalty={self.repetition_penalty} must be in (0, 2] (1 is off)"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "logit_bias maps token ids >= 0 to biases in [-100, 100]"),
            (self.min_tokens >= 0, f"min_tokens={self.min_tokens} must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs={self.logprobs} must be in [0, {MAX_TOP_LOGPROBS}]"),
            (self.watermark_key is None or (isinstance(self.watermark_key, str)
                                            and self.watermark_key != ""),
             "watermark_key must be None or a non-empty string"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (they need the row's token counts)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """SamplingParams of every row as device arrays [batch], so mixing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    bias_ids: jax.Array  # int32 [batch, MAX_LOGIT_BIAS]; -1 where unused
    bias: jax.Array  # float32 [batch, MAX_LOGIT_BIAS]
    min_tokens: jax.Array
    logprobs: jax.Array  # int32: top logprobs wanted, NO_LOGPROBS for none
    watermark: jax.Array  # bool: whether the row is watermarked
    watermark_key: jax.Array  # uint32 [batch, 2]: the key's material (zeros where off)

    @classmethod
    def stack(cls, rows: list[SamplingParams]) -> SamplingArrays:
        column = lambda name, dtype: np.array([getattr(r, name) for r in rows], dtype)  # noqa: E731
        bias_ids = np.full((len(rows), MAX_LOGIT_BIAS), -1, np.int32)
        bias = np.zeros((len(rows), MAX_LOGIT_BIAS), np.float32)
        for i, row in enumerate(rows):
            for j, (token, value) in enumerate(row.logit_bias):
                bias_ids[i, j], bias[i, j] = token, value
        keys = np.zeros((len(rows), 2), np.uint32)
        for i, row in enumerate(rows):
            if row.watermark_key is not None:
                keys[i] = watermark.key_words(row.watermark_key)
        return cls(
            temperature=column("temperature", np.float32),
            top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            seed=column("seed", np.uint32),
            presence_penalty=column("presence_penalty", np.float32),
            frequency_penalty=column("frequency_penalty", np.float32),
            repetition_penalty=column("repetition_penalty", np.float32),
            bias_ids=bias_ids,
            bias=bias,
            min_tokens=column("min_tokens", np.int32),
            logprobs=np.array([NO_LOGPROBS if r.logprobs is None else r.logprobs for r in rows],
                              np.int32),
            watermark=np.array([r.watermark_key is not None for r in rows], bool),
            watermark_key=keys,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenCounts:
    """Which tokens each row has seen, for the penalties: [rows, vocab] each."""

    output: jax.Array  # int32: times each token was generated
    prompt: jax.Array  # bool: whether it occurs in the prompt

    @classmethod
    def of(cls, tokens: jax.Array, lengths: jax.Array, count: jax.Array,
           vocab: int) -> TokenCounts:
        """Counts for sequences `tokens` [rows, seq] of `lengths` whose last `count` tokens
        were generated (a resumed request) and the rest is prompt."""
        rows, seq = tokens.shape
        place = jnp.arange(seq)[None]
        generated = (place >= (lengths - count)[:, None]) & (place < lengths[:, None])
        prompt = place < (lengths - count)[:, None]
        row = jnp.broadcast_to(jnp.arange(rows)[:, None], tokens.shape)
        output = jnp.zeros((rows, vocab), jnp.int32).at[row, tokens].add(generated)
        seen = jnp.zeros((rows, vocab), bool).at[row, tokens].max(prompt)
        return cls(output=output, prompt=seen)

    def add(self, token: jax.Array, live: jax.Array) -> TokenCounts:
        """Counts `token` [rows] once in every `live` [rows] row; or tokens [rows, n], each
        where `live` [rows, n]."""
        rows = jnp.arange(token.shape[0]).reshape(-1, *([1] * (token.ndim - 1)))
        return dataclasses.replace(
            self, output=self.output.at[rows, jnp.maximum(token, 0)].add(live.astype(jnp.int32)))


def adjust_logits(logits: jax.Array, params: SamplingArrays, counts: TokenCounts | None,
                  stop_ids: jax.Array, count: jax.Array,
                  bitmask: jax.Array | None = None,
                  previous: jax.Array | None = None) -> jax.Array:
    """logits [batch, vocab] -> the logits sampling draws from: penalties (with `counts`),
    logit bias, the watermark of watermarked rows (its green list hashed from `previous`
    [batch], each row's token before the one drawn now; the decode core always passes it,
    None is only for callers with no watermarked row), stop ids [batch, stops] masked while
    `count` < min_tokens, and tokens outside `bitmask` [batch, ceil(vocab / 32)] int32 (bit
    t % 32 of word t // 32 allows token t; a structured-output grammar's) masked. A row with
    every control off (and all bits set) keeps its logits bitwise (x - 0 == x, x * 1 == x),
    so free rows do not depend on what runs beside them."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    logits = logits.astype(jnp.float32)

    def penalize(logits):
        output = counts.output
        seen = (output > 0) | counts.prompt
        repetition = params.repetition_penalty[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition),
                           logits)
        logits = logits - params.frequency_penalty[:, None] * output
        return logits - params.presence_penalty[:, None] * (output > 0)

    if counts is not None:
        on = ((params.presence_penalty != 0) | (params.frequency_penalty != 0)
              | (params.repetition_penalty != 1))
        logits = jax.lax.cond(jnp.any(on), penalize, lambda x: x, logits)
    in_vocab = lambda ids: jnp.where(ids < 0, vocab, ids)  # noqa: E731 - past the end: dropped
    logits = logits.at[rows, in_vocab(params.bias_ids)].add(params.bias, mode="drop")
    if previous is not None:
        logits = watermark.bias(logits, params.watermark, params.watermark_key, previous)
    early = jnp.broadcast_to(count, (batch,)) < params.min_tokens
    stops = jnp.where(early[:, None], in_vocab(stop_ids), vocab)
    logits = logits.at[rows, stops].set(-jnp.inf, mode="drop")
    if bitmask is None:
        return logits
    token = jnp.arange(vocab)
    allowed = (bitmask[:, token // 32] >> (token % 32)) & 1
    return jnp.where(allowed == 1, logits, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenLogprobs:
    """Logprobs of chosen tokens and of the most likely ones; leading axes [batch, ...]."""

    chosen: jax.Array  # float32 [...]: the chosen token's
    top_ids: jax.Array  # int32 [..., MAX_TOP_LOGPROBS], most likely first
    top: jax.Array  # float32 [..., MAX_TOP_LOGPROBS]

    def row(self, index) -> TokenLogprobs:
        return jax.tree.map(lambda x: x[index], self)

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> TokenLogprobs:
        """All zeros, leading axes `shape`: what rows that asked for no logprobs get."""
        top = (*shape, MAX_TOP_LOGPROBS)
        return TokenLogprobs(jnp.zeros(shape, jnp.float32), jnp.zeros(top, jnp.int32),
                             jnp.zeros(top, jnp.float32))


def token_logprobs(logits: jax.Array, token: jax.Array, params: SamplingArrays) -> TokenLogprobs:
    """Logprobs of the raw model logits [batch, vocab] (vLLM's default, before temperature,
    penalties and bias), for `token` [batch] and the MAX_TOP_LOGPROBS most likely tokens;
    computed only when some row asked for logprobs (zeros otherwise)."""
    batch = logits.shape[0]

    def compute():
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = logprobs[jnp.arange(batch), jnp.maximum(token, 0)]
        top, ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
        return TokenLogprobs(chosen, ids.astype(jnp.int32), top)

    return jax.lax.cond(jnp.any(params.logprobs >= 0), compute,
                        lambda: TokenLogprobs.zeros((batch,)))


def sample(logits: jax.Array, params: SamplingArrays, count: jax.Array) -> jax.Array:
    """logits [batch, vocab] -> tokens [batch]. `count` ([batch] or a scalar): tokens each row
    has generated so far; row b's draw is keyed on (its seed, count[b]) alone, so a seeded
    request draws the same tokens in generate(), in any serving slot and at any batch width."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
        scaled = logits.astype(jnp.float32) / temperature
        ranked = -jnp.sort(-scaled, axis=-1)  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        rank = jnp.arange(scaled.shape[-1])[None]
        top_k = jnp.where(params.top_k > 0, params.top_k, scaled.shape[-1])[:, None]
        keep = rank < top_k
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None]
        keep &= probs >= params.min_p[:, None] * probs[:, :1]
        keep = keep.at[:, 0].set(True)  # the most likely token always survives
        # Keep every token scoring at least the lowest kept rank's score.
        threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        counts = jnp.broadcast_to(count, params.seed.shape)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(params.seed, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda: greedy)
