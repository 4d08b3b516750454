"""Input screening: checks each request passes before it is admitted to the engine.

    screen = Screen(ScreeningConfig(requests_per_minute=60, prompt_tokens_per_minute=20_000,
                                    deny_patterns=[r"(?i)\\bsecret plan\\b"],
                                    injection_threshold=0.5))
    screen.check(client, prompt_text, prompt_tokens)   # raises Blocked, or returns

The server calls `check` on a worker thread (asyncio.to_thread), after tokenizing and before
`scheduler.submit`, so screening never runs on the engine loop and adds no decode latency.
In order, a request is blocked by:

- a prompt larger than one client may send in a minute, or than `max_prompt_tokens`: 400
  `prompt_too_large` (waiting would not help);
- its client's request rate or prompt-token rate (token buckets per client, OpenAI's RPM and
  TPM): 429 with `Retry-After` seconds, code `rate_limited` / `prompt_tokens_rate_limited`;
- a deny-list pattern (Python regexes, `re.search`): 400 `denied_pattern`;
- the injection scorer's score at or above `injection_threshold`: 400 `prompt_injection`.

A client is the request's API key (hashed, never stored as given), else its address. No
classifier model for prompt injection ships on the package registries in a format our weight
loaders read (the ones there wrap Hugging Face hub models, which this project cannot fetch),
so the scorer is `HeuristicInjectionScorer`; anything with `score(text) -> float` plugs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Blocked(Exception):
    """A request screening refused: HTTP `status`, a `reason` code, and for 429 the seconds
    after which the client may retry."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = (
            status, reason, message, retry_after)


class InjectionScorer(Protocol):
    def score(self, text: str) -> float:
        """How likely `text` is a prompt-injection or jailbreak attempt, in [0, 1]."""


# (pattern, weight): phrasings common in published jailbreak / injection prompts (the "DAN"
# family, "ignore previous instructions", system-prompt extraction). A heuristic, not a model.
_INJECTION_CUES = (
    (r"\b(ignore|disregard|forget|override)\b.{0,30}\b(previous|prior|above|earlier|all|your)"
     r"\b.{0,20}\b(instructions?|rules|prompts?|guidelines|directions)", 0.6),
    (r"\b(reveal|print|show|repeat|output|leak)\b.{0,30}\b(system|hidden|initial)\s+"
     r"(prompt|instructions?|message)", 0.5),
    (r"\bdo anything now\b|\bDAN\b(?=.{0,40}\b(mode|prompt|jailbreak)\b)|\byou are (now )?DAN\b",
     0.6),
    (r"\b(developer|god|jailbreak|unrestricted|evil) mode\b", 0.45),
    (r"\b(no|without( any)?) (restrictions|filters|rules|limitations|guidelines|censorship)\b",
     0.3),
    (r"\bjailbr(eak|oken)\b", 0.35),
    (r"\bpretend\b.{0,40}\b(you are|to be|you're)\b", 0.2),
    (r"\b(act|respond) as\b.{0,40}\b(unfiltered|uncensored|unrestricted|without)\b", 0.35),
    (r"<\|?(im_start|system|endoftext)\|?>|\[/?(INST|SYS)\]", 0.3),  # chat-format tokens
)


class HeuristicInjectionScorer:
    """A HEURISTIC prompt-injection / jailbreak scorer (regex cues with weights, combined as
    1 - prod(1 - w) over the cues found), not a trained classifier: it catches the common
    phrasings and misses paraphrases. One cue of "ignore previous instructions" scores 0.6."""

    def __init__(self, cues: tuple[tuple[str, float], ...] = _INJECTION_CUES):
        self.cues = [(re.compile(p, re.IGNORECASE | re.DOTALL), w) for p, w in cues]

    def score(self, text: str) -> float:
        clean = 1.0
        for pattern, weight in self.cues:
            if pattern.search(text):
                clean *= 1.0 - weight
        return 1.0 - clean


@dataclasses.dataclass(frozen=True)
class ScreeningConfig:
    """What screening enforces; None turns a check off (everything is off by default)."""

    requests_per_minute: float | None = None  # per client
    prompt_tokens_per_minute: float | None = None  # per client
    max_prompt_tokens: int | None = None  # per request
    deny_patterns: tuple[str, ...] = ()
    injection_threshold: float | None = None  # block at score >= this

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.requests_per_minute,
                                           self.prompt_tokens_per_minute,
                                           self.max_prompt_tokens,
                                           self.injection_threshold)) or bool(self.deny_patterns)


class TokenBuckets:
    """One token bucket per client: `rate_per_minute` refill, `rate_per_minute` capacity (a
    minute's worth may come at once). Thread-safe: the server's worker threads share it."""

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic):
        if rate_per_minute <= 0:
            raise ValueError(f"a rate limit must be > 0 per minute; got {rate_per_minute}")
        self.capacity, self.rate = rate_per_minute, rate_per_minute / 60.0  # per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (level, when)
        self._lock = threading.Lock()

    def take(self, client: str, amount: float = 1.0) -> float:
        """Takes `amount` from `client`'s bucket; returns 0, or (taking nothing) the seconds
        until the bucket holds `amount`."""
        with self._lock:
            now = self.clock()
            level, when = self._buckets.get(client, (self.capacity, now))
            level = min(self.capacity, level + (now - when) * self.rate)
            if level >= amount:
                self._buckets[client] = (level - amount, now)
                return 0.0
            self._buckets[client] = (level, now)
            return (amount - level) / self.rate


def client_id(api_key: str | None, address: str | None) -> str:
    """The rate limits' client: a hash of the API key given (so no key sits in memory as
    sent), else the peer address."""
    if api_key:
        return "key:" + hashlib.blake2b(api_key.encode(), digest_size=12).hexdigest()
    return f"addr:{address or 'unknown'}"


class Screen:
    """The checks of a `ScreeningConfig` (module doc); `scorer` defaults to the heuristic."""

    def __init__(self, config: ScreeningConfig, scorer: InjectionScorer | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.deny = []
        for pattern in config.deny_patterns:
            try:
                self.deny.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"deny pattern {pattern!r} is not a valid regex: {e}") from e
        if config.injection_threshold is not None and not 0 < config.injection_threshold <= 1:
            raise ValueError(f"injection_threshold is {config.injection_threshold}; it must be "
                             "in (0, 1]")
        self.scorer = scorer or HeuristicInjectionScorer()
        self.requests = self.prompt_tokens = None
        if config.requests_per_minute is not None:
            self.requests = TokenBuckets(config.requests_per_minute, clock)
        if config.prompt_tokens_per_minute is not None:
            self.prompt_tokens = TokenBuckets(config.prompt_tokens_per_minute, clock)

    def check(self, client: str, text: str, prompt_tokens: int) -> None:
        """Raises Blocked when the request may not be admitted (module doc for the order)."""
        limit = self.config.max_prompt_tokens
        if self.prompt_tokens is not None:
            limit = min(limit or math.inf, self.prompt_tokens.capacity)
        if limit is not None and prompt_tokens > limit:
            raise Blocked(400, "prompt_too_large", f"the prompt has {prompt_tokens} tokens; "
                          f"this server accepts at most {int(limit)} per request")
        if self.requests is not None and (wait := self.requests.take(client)):
            raise Blocked(429, "rate_limited", "too many requests: this client may send "
                          f"{self.config.requests_per_minute:g} per minute", math.ceil(wait))
        if self.prompt_tokens is not None and (wait := self.prompt_tokens.take(client,
                                                                               prompt_tokens)):
            raise Blocked(429, "prompt_tokens_rate_limited", f"too many prompt tokens: this "
                          f"client may send {self.config.prompt_tokens_per_minute:g} per minute",
                          math.ceil(wait))
        for i, pattern in enumerate(self.deny):
            if pattern.search(text):  # the message names the rule's index, not the text
                raise Blocked(400, "denied_pattern", f"the prompt matches deny-list rule {i}")
        threshold = self.config.injection_threshold
        if threshold is not None and (score := self.scorer.score(text)) >= threshold:
            raise Blocked(400, "prompt_injection", f"the prompt scored {score:.2f} as a likely "
                          f"prompt injection or jailbreak (threshold {threshold:g})")


def read_deny_file(path: str) -> tuple[str, ...]:
    """The regexes of a deny-list file: one per line; blank lines and `#` comments skipped."""
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return tuple(line for line in lines if line and not line.startswith("#"))
