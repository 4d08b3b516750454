"""The scheduler: a bounded waiting queue in front of the engine's slots, run by one thread.

The scheduler owns the decode state (on the device) and the page table (`pages.PageTable`,
on the host) and keeps running requests packed into the lowest slots, so each decode call
runs only as many slots as are in use (rounded up to a compiled width). Each loop iteration:
drop aborted requests (freeing their slots and pages), admit waiting requests while slots
and pages allow (prefill, then insert), then one `generate()` call, whose tokens are
detokenized, checked for stop strings and handed to each request's `sink`. When the page
pool runs dry mid-decode, the newest running request is preempted: its pages are freed and
it waits at the head of the queue, to be resumed later by prefilling its prompt plus what it
has generated so far (recompute, as vLLM does).

Prefix caching (`pages.PageTable`): an admitted request takes the cached pages of its longest
cached prefix and prefills only the rest; its full pages are cached after prefill, and again
(with what it generated) when it leaves its slot. Chunked prefill: each iteration prefills at
most `max_num_batched_tokens` prompt tokens before its decode call. A prompt whose uncached
part is longer than one prefill call (`engine.chunk`) is prefilled a chunk per call, one such
prompt at a time, holding a slot in reserve and taking pages as its chunks need them; the
running requests decode between its chunks.

A request whose prefill or insert raises fails alone (its sink gets an Output with `error`)
and the loop carries on; only a device failure (a `JaxRuntimeError`, or any error while
decoding all slots) stops the loop, which then ends every request with that error.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import structured
from jaxinfer.serving.engine import NO_TOKEN, Engine, PrefillRow
from jaxinfer.serving.pages import HostTier, PageTable
from jaxinfer.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


def host_tier(engine: Engine, force: bool = False) -> HostTier | None:
    """The host tier `engine.config.host_kv_cache_gb` asks for, or None: none asked, prefix
    caching off, or (unless `force`) a CPU-only machine, where it would copy host to host."""
    config = engine.config
    if config.host_kv_cache_gb <= 0 or not config.enable_prefix_caching:
        return None
    if not force and all(d.platform == "cpu" for d in jax.devices()):
        log.info("host_kv_cache_gb=%g is a no-op here: the KV pool is in host memory already",
                 config.host_kv_cache_gb)
        return None
    return HostTier(int(config.host_kv_cache_gb * 2**30), engine.read_pages, engine.write_pages)


class QueueFull(Exception):
    """The waiting queue holds max_queue_size requests already (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine loop is not running (stopped, or died on an error) (HTTP 503)."""


@dataclasses.dataclass
class Output:
    """What a request's sink receives: new text and tokens since the last Output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length" or "abort" at the end
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # why the request failed or was cut; finish_reason is "abort" then
    cached_tokens: int = 0  # prompt tokens whose KV pages came from the prefix cache
    # For requests that asked for logprobs: one TokenLogprob per token of `token_ids`.
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's logprob under the raw model logits, and the top `k` tokens'."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress. Fill the first block; the rest is state."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's own stop ids
    sink: Callable[[Output], None] = lambda output: None  # called on the engine thread
    matcher: Any = None  # an llguidance LLMatcher: structured output (see serving.structured)
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    arrival: float = 0.0
    admitted: float = 0.0  # when it last got a slot (the newest is preempted first)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the sink
    slot: int | None = None
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float = 0.0
    preemptions: int = 0
    cached_tokens: int = 0  # at its first admission: prompt tokens found in the prefix cache
    detokenizer: IncrementalDetokenizer | None = None
    stop_id_set: frozenset[int] = frozenset()


class Scheduler:
    """Runs `engine` on a background thread; `submit` and `abort` are thread-safe."""

    def __init__(self, engine: Engine, metrics=None):
        self.engine = engine
        self.config = engine.config
        self.metrics = metrics  # a serving.metrics.Metrics, or None
        self.pages = PageTable(engine.num_pages, engine.page_size, engine.slots,
                               engine.pages_per_seq, self.config.enable_prefix_caching,
                               repr(engine.model_config).encode(), host_tier(engine))
        self.state = engine.init_state()  # the decode state of every slot, on the device
        if metrics and (host := self.pages.host) is not None:
            metrics.watch_host_tier(lambda: len(host), lambda: host.bytes)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._requests: dict[str, Request] = {}  # every live request by id
        self._aborts: set[str] = set()
        self._partial: Request | None = None  # the prompt being prefilled in chunks
        self._partial_pages: list[int] = []  # its pages so far (cached ones first)
        self._partial_start = 0  # positions of it whose K/V are written
        self._partial_hits = 0  # of those, found in the prefix cache
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_error: str | None = None  # what requests still live at stop() are told
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0  # generate() calls so far
        self.preemptions = 0

    # -- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None, error: str | None = None) -> None:
        """Stops the loop after its current step; requests still live end with "abort" (and
        `error`, if given)."""
        with self._cond:
            self._stopping = True
            self._stop_error = self._stop_error or error
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the loop thread runs and has not failed."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (waiting, being prefilled or running)."""
        return len(self._requests)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the page pool in use (0 to 1)."""
        return 1.0 - self.pages.free_count / self.pages.usable

    @property
    def context(self) -> int:
        """The longest request (prompt + generated tokens) this engine serves."""
        return self.engine.context

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def check(self, prompt_tokens: int, max_tokens: int, stop_token_ids: int = 0) -> None:
        """Raises ValueError (with the numbers) for a request this engine cannot serve."""
        context = self.engine.context
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty; it needs at least one token")
        if prompt_tokens >= context:
            raise ValueError(
                f"the prompt has {prompt_tokens} tokens; this model's maximum context length "
                f"is {context} tokens, which must hold the prompt and at least one new token"
            )
        if prompt_tokens + max_tokens > context:
            raise ValueError(
                f"this model's maximum context length is {context} tokens; the request has "
                f"{prompt_tokens} prompt tokens and max_tokens={max_tokens}, together "
                f"{prompt_tokens + max_tokens} (at most {max(context - prompt_tokens, 0)} new "
                f"tokens fit after this prompt)"
            )
        room = self.config.max_stop_token_ids - len(self.engine.tokenizer.stop_ids)
        if stop_token_ids > room:
            raise ValueError(f"{stop_token_ids} stop_token_ids; at most {room} are allowed")

    def submit(self, request: Request) -> None:
        """Queues `request`; raises QueueFull, EngineUnavailable or ValueError."""
        self.check(len(request.prompt_ids), request.max_tokens, len(request.stop_token_ids))
        request.arrival = time.perf_counter()
        request.detokenizer = IncrementalDetokenizer(self.engine.tokenizer)
        eos = () if request.sampling.ignore_eos else self.engine.tokenizer.stop_ids
        request.stop_id_set = frozenset(eos) | set(request.stop_token_ids)
        with self._cond:
            if not self.alive or self._stopping:
                raise EngineUnavailable(self.why_unavailable())
            if len(self._waiting) >= self.config.max_queue_size:
                raise QueueFull(
                    f"the server's queue is full ({self.config.max_queue_size} requests "
                    f"waiting); retry later"
                )
            self._waiting.append(request)
            self._requests[request.id] = request
            self._cond.notify_all()

    def abort(self, request_id: str) -> None:
        """Ends the request (finish reason "abort") and frees its slot and pages soon."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    def why_unavailable(self) -> str:
        """Why the engine is not serving, in words (for HTTP 503)."""
        if self.error is not None:
            return f"the engine stopped on an error: {self.error!r}"
        return "the engine is not running (starting up or shutting down)"

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._step():
                pass
            self._finish_all("abort", self._stop_error)
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure
            log.exception("engine loop failed")
            self.error = e
            self._finish_all("abort", f"the engine stopped on an error: {e!r}")

    def _step(self) -> bool:
        with self._cond:
            if self._stopping:
                return False
            if not (self._running or self._waiting or self._aborts or self._partial):
                self._cond.wait()
                return True
            aborts, self._aborts = self._aborts, set()
        for request_id in aborts:
            self._abort(request_id)
        admitted, budget = False, self.config.max_num_batched_tokens
        while budget > 0:  # prefill calls up to the token budget, then one decode call
            if self._partial is None:
                self._start_partial()
            used = self._prefill_chunk() if self._partial is not None else self._admit()
            if not used:
                break
            admitted, budget = True, budget - used
        if self._running:
            self._decode()
        elif not admitted:
            with self._cond:  # a partial prefill batch is being held for max_queue_delay
                if self._waiting and not self._aborts and not self._stopping:
                    self._cond.wait(timeout=max(self._hold_time(), 1e-3))
        return True

    def _abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)
        if request.slot is not None:
            self._release_slot(request)
        if request is self._partial:
            self._drop_partial(cache=True)
        self._finish(request, "abort")

    def _hold_time(self) -> float:
        """Seconds left before the oldest waiting request's partial batch must go."""
        if not self._waiting:
            return 0.0
        delay = self.config.max_queue_delay_ms / 1e3
        return self._waiting[0].arrival + delay - time.perf_counter()

    def _free_slots(self) -> list[int]:
        """Free slots, lowest first, less the one held in reserve for a chunked prompt."""
        free = [s for s in range(self.engine.slots) if s not in self._running]
        return free[:-1] if self._partial is not None else free

    def _start_partial(self) -> None:
        """Makes the head of the queue the chunked prompt if its uncached part needs more
        than one prefill call (and a slot is free for it)."""
        engine = self.engine
        with self._cond:
            if not self._waiting or not self._free_slots():
                return
            head = self._waiting[0]
            sequence = head.prompt_ids + head.output_ids
            if len(sequence) <= engine.chunk:
                return
            cached = self.pages.lookup(sequence)
            if len(sequence) - len(cached) * engine.page_size <= engine.chunk:
                self.pages.release(cached)  # one call does: the usual admission takes it
                return
            self._waiting.popleft()
        self._partial, self._partial_pages = head, cached
        self._partial_start = self._partial_hits = len(cached) * engine.page_size

    def _drop_partial(self, cache: bool) -> None:
        """Releases the chunked prompt's pages (caching those written, with `cache`)."""
        request, pages = self._partial, self._partial_pages
        if cache:
            self.pages.cache(pages, (request.prompt_ids + request.output_ids)[
                : self._partial_start])
        self.pages.release(pages)
        self._partial, self._partial_pages, self._partial_start = None, [], 0

    def _prefill_chunk(self) -> int:
        """Prefills the chunked prompt's next chunk; after its last, inserts it into a slot.
        Returns the tokens prefilled (0: none, waiting for pages)."""
        engine, request = self.engine, self._partial
        sequence = request.prompt_ids + request.output_ids
        start = self._partial_start
        end = min(start + engine.chunk, len(sequence))
        last = end == len(sequence)
        need = self.pages.pages_for(end + engine.positions_per_call if last else end)
        new = self.pages.allocate(need - len(self._partial_pages))
        if new is None:
            return 0  # running requests finish or get preempted, and give pages back
        self._partial_pages += new
        row = PrefillRow(sequence[start:end], list(self._partial_pages), request.sampling,
                         count=len(request.output_ids), max_tokens=request.max_tokens,
                         stop_ids=sorted(request.stop_id_set), bitmask=self._mask(request),
                         start=start, before=sequence[:start])
        try:
            prefix = engine.prefill([row])
        except jax.errors.JaxRuntimeError:
            raise  # the device failed: the loop stops
        except Exception as e:  # noqa: BLE001 - this request fails, not the loop
            self._drop_partial(cache=False)
            self._fail(request, e)
            return end - start
        self._partial_start = end
        if not last:
            self.pages.cache(self._partial_pages, sequence[:end])
            return end - start
        self._partial, self._partial_pages, self._partial_start = None, [], 0
        self._start_running([(request, row, prefix, 0)], [self._free_slots()[0]],
                            self._partial_hits)
        return end - start

    def _admit(self) -> int:
        """Prefills one group of waiting requests of one length bucket into free slots;
        returns the tokens prefilled (0: none)."""
        engine = self.engine
        free_slots = self._free_slots()
        if not free_slots:
            return 0
        with self._cond:
            if not self._waiting:
                return 0
            head = self._waiting[0]
            seq_bucket = engine.bucket(len(head.prompt_ids) + len(head.output_ids))
            target = min(self.config.prefill_batch_size, len(free_slots))
            group = [
                r for r in self._waiting
                if engine.bucket(len(r.prompt_ids) + len(r.output_ids)) == seq_bucket
            ][:target]
            if len(group) < target and self._hold_time() > 0:
                return 0
            # Take pages for each prompt plus one decode call's worth, first come first served:
            # the cached pages of its longest cached prefix, then new ones for the rest.
            rows, taken = [], []
            for request in group:
                sequence = request.prompt_ids + request.output_ids
                cached = self.pages.lookup(sequence)
                if len(sequence) - len(cached) * engine.page_size > engine.chunk:
                    self.pages.release(cached)
                    break  # prefilled in chunks, once the one before it is done
                new = self.pages.allocate(
                    self.pages.pages_for(len(sequence) + engine.positions_per_call)
                    - len(cached))
                if new is None:
                    self.pages.release(cached)
                    break
                start = len(cached) * engine.page_size
                rows.append(PrefillRow(sequence[start:], cached + new, request.sampling,
                                       count=len(request.output_ids),
                                       max_tokens=request.max_tokens,
                                       stop_ids=sorted(request.stop_id_set),
                                       bitmask=self._mask(request), start=start,
                                       before=sequence[:start]))
                taken.append(request)
                self._waiting.remove(request)
        if not taken:
            return 0
        self._start_running(self._prefill(taken, rows), free_slots)
        return sum(len(row.tokens) for row in rows)

    def _start_running(self, prefilled: list[tuple], free_slots: list[int],
                       cached_tokens: int | None = None) -> None:
        """Inserts each prefilled (request, row, prefix, i) into the next free slot and emits
        its first token. `cached_tokens`: what a chunked prompt found cached (else row.start)."""
        engine = self.engine
        now = time.perf_counter()
        admitted = []
        for request, row, prefix, i in prefilled:
            slot = free_slots[len(admitted)]  # the lowest free slots: requests stay packed
            try:
                state = engine.insert(prefix, self.state, slot, i)
            except jax.errors.JaxRuntimeError:
                raise  # the device failed: the loop stops
            except Exception as e:  # noqa: BLE001 - this request fails, not the loop
                self.pages.release(row.pages)
                self._fail(request, e)
                continue
            self.state = state
            sequence = request.prompt_ids + request.output_ids
            self.pages.cache(row.pages, sequence)  # prefill wrote every position of it
            hits = row.start if cached_tokens is None else cached_tokens
            if request.preemptions == 0:
                request.cached_tokens = hits
            if self.metrics:
                self.metrics.prefix_cache_queries.inc(len(sequence))
                self.metrics.prefix_cache_hits.inc(hits)
                if request.preemptions == 0:
                    self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            request.slot, request.admitted = slot, now
            self._running[slot] = request
            self.pages.assign(slot, row.pages)
            admitted.append((request, prefix.tokens[i],
                             None if prefix.logprobs is None else prefix.logprobs.row(i)))
        for request, token, logprobs in admitted:
            self._emit(request, [token], now, _token_logprobs(request, [token], logprobs))

    def _prefill(self, requests: list[Request], rows: list[PrefillRow]) -> list[tuple]:
        """(request, row, prefix, its row in the prefix) for each request whose prefill
        worked. A request whose prefill raises fails alone: a failed batch is retried row by
        row, so that only the culprit does."""
        try:
            prefix = self.engine.prefill(rows)
            return [(r, row, prefix, i) for i, (r, row) in enumerate(zip(requests, rows,
                                                                          strict=True))]
        except jax.errors.JaxRuntimeError:
            raise  # the device failed: the loop stops
        except Exception as e:  # noqa: BLE001 - one request's bad input must not stop the loop
            if len(rows) > 1:
                return [done for r, row in zip(requests, rows, strict=True)
                        for done in self._prefill([r], [row])]
            self.pages.release(rows[0].pages)
            self._fail(requests[0], e)
            return []

    def _fail(self, request: Request, error: Exception) -> None:
        log.error("request %s failed; the engine carries on", request.id, exc_info=error)
        self._finish(request, "abort", error=f"the request failed in the engine: {error!r}")

    def _decode(self) -> None:
        engine = self.engine
        # Pages for the positions the next call writes, oldest requests first.
        for request in sorted(self._running.values(), key=lambda r: r.admitted):
            if request.slot is None:
                continue  # preempted just now
            # The next call writes positions from the last token's up to `steps` more (times
            # k + 1 with speculation).
            position = len(request.prompt_ids) + len(request.output_ids) - 1
            needed = min(position + engine.positions_per_call,
                         len(request.prompt_ids) + request.max_tokens)
            while request.slot is not None and not self.pages.grow(request.slot, needed):
                self._preempt(max(self._running.values(), key=lambda r: r.admitted))
        if not self._running:
            return
        width = engine.decode_width(len(self._running))  # requests are packed from slot 0
        # The same program either way; logprobs come to the host only when asked for.
        constrained = [r for r in self._running.values() if r.matcher is not None]
        wants_logprobs = any(r.sampling.logprobs is not None for r in self._running.values())
        if constrained or wants_logprobs:
            # A grammar's mask holds for one token: one step per call while one runs.
            bitmask = engine.any_token(width)
            structured.fill_masks([(r.matcher, r.slot) for r in constrained], bitmask)
            self.state, tokens, *logprobs = engine.generate(
                self.state, self.pages.table, width, logprobs=wants_logprobs,
                bitmask=bitmask, steps=1 if constrained else None)
        else:
            (self.state, tokens), logprobs = engine.generate(self.state, self.pages.table,
                                                             width), ()
        self.steps += 1
        if self.metrics and engine.draft_tokens:
            self.metrics.speculated(engine.last_speculation)
        now = time.perf_counter()
        for slot, request in list(self._running.items()):
            new = [int(t) for t in tokens[slot] if t != NO_TOKEN]
            if new:
                row = logprobs[0].row(slot) if logprobs else None
                self._emit(request, new, now, _token_logprobs(request, new, row))

    def _mask(self, request: Request):
        """The request's next-token bitmask [words] (None: unconstrained)."""
        if request.matcher is None:
            return None
        return structured.next_token_mask(request.matcher, self.vocab_size)

    def _preempt(self, request: Request) -> None:
        """Frees the request's slot and pages; it resumes from the head of the queue."""
        log.info("preempting request %s after %d tokens (KV pages ran out)",
                 request.id, len(request.output_ids))
        self._release_slot(request)
        request.preemptions += 1
        self.preemptions += 1
        if self.metrics:
            self.metrics.preemptions.inc()
        with self._cond:
            self._waiting.appendleft(request)

    def _release_slot(self, request: Request) -> None:
        """Frees the request's slot and pages, and moves the highest running request into
        the hole, so running requests stay packed into the lowest slots."""
        slot, engine = request.slot, self.engine
        self.state = engine.free(self.state, slot)
        # Every position but the newest token's holds its K/V: keep the full pages findable.
        written = request.prompt_ids + request.output_ids[:-1]
        self.pages.cache(self.pages.slot_pages[slot], written)
        self.pages.free(slot)
        del self._running[slot]
        request.slot = None
        top = max(self._running, default=-1)
        if top > slot:
            self.state = engine.move(self.state, top, slot)
            self.pages.move(top, slot)
            self._running[slot] = moved = self._running.pop(top)
            moved.slot = slot

    # -- output -------------------------------------------------------------------------------

    def _emit(self, request: Request, tokens: list[int], now: float,
              logprobs: list[TokenLogprob] | None = None) -> None:
        """Appends generated tokens, detects the end, and hands new text to the sink."""
        if request.finish_reason is not None:
            return
        reason = None
        longest_stop = max(map(len, request.stop), default=0)
        taken = 0
        for token in tokens:
            request.output_ids.append(token)
            taken += 1
            if request.matcher is not None:
                request.matcher.consume_token(token)
            if token in request.stop_id_set:
                reason = "stop"
            else:
                reason = self._add_text(request, request.detokenizer.add(token), longest_stop)
            if reason is None and len(request.output_ids) >= request.max_tokens:
                reason = "length"
            if reason is not None:
                break
        if reason is not None and reason != "stop_string":
            reason = self._add_text(request, request.detokenizer.flush(), longest_stop) or reason
        reason = "stop" if reason == "stop_string" else reason
        self._observe(request, len(tokens), now)
        if reason is None:
            # Hold back a tail that could still become a stop string.
            end = len(request.text) - max(longest_stop - 1, 0)
        else:
            end = len(request.text)
        text = request.text[request.sent : end] if end > request.sent else ""
        request.sent = max(request.sent, end)
        request.sink(Output(text, tokens[:taken], reason if reason else None,
                            len(request.prompt_ids), len(request.output_ids),
                            logprobs=None if logprobs is None else logprobs[:taken],
                            cached_tokens=request.cached_tokens))
        if reason is not None:
            if request.slot is not None:
                self._release_slot(request)
            self._finish(request, reason, notify=False)

    @staticmethod
    def _add_text(request: Request, piece: str, longest_stop: int) -> str | None:
        """Appends `piece`; on a stop string cuts the text before it and says "stop_string"."""
        if not piece:
            return None
        start = max(len(request.text) - longest_stop + 1, 0)
        request.text += piece
        hits = [i for i in (request.text.find(s, start) for s in request.stop) if i >= 0]
        if hits:
            request.text = request.text[: min(hits)]
            return "stop_string"
        return None

    def _observe(self, request: Request, new_tokens: int, now: float) -> None:
        metrics = self.metrics
        if request.first_token_time is None:
            request.first_token_time = now
            if metrics:
                metrics.time_to_first_token.observe(now - request.arrival)
        elif metrics and new_tokens:
            # Tokens of one decode call arrive together; spread the wait evenly over them.
            gap = (now - request.last_token_time) / new_tokens
            for _ in range(new_tokens):
                metrics.inter_token_latency.observe(gap)
        request.last_token_time = now
        if metrics:
            metrics.generation_tokens.inc(new_tokens)

    def _finish(self, request: Request, reason: str, notify: bool = True,
                error: str | None = None) -> None:
        if self._requests.pop(request.id, None) is None:
            return
        request.finish_reason = reason
        if notify:
            request.sink(Output("", [], reason, len(request.prompt_ids),
                                len(request.output_ids), error, request.cached_tokens))
        if self.metrics:
            self.metrics.finished(reason)
            self.metrics.e2e_request_latency.observe(time.perf_counter() - request.arrival)

    def _finish_all(self, reason: str, error: str | None) -> None:
        with self._cond:
            self._waiting.clear()
            self._running.clear()
            self._partial = None
            requests = list(self._requests.values())
        for request in requests:
            self._finish(request, reason, error=error)


def _token_logprobs(request: Request, tokens: list[int], logprobs) -> list[TokenLogprob] | None:
    """TokenLogprobs of `tokens` (a slot's new tokens, in order) from the engine's host arrays
    for that slot ([steps, ...] or, after prefill, [...]); None if the request wants none."""
    k = request.sampling.logprobs
    if k is None or logprobs is None:
        return None
    chosen = np.reshape(logprobs.chosen, -1)
    top_ids = np.reshape(logprobs.top_ids, (len(chosen), -1))
    top = np.reshape(logprobs.top, (len(chosen), -1))
    return [TokenLogprob(token, float(chosen[i]),
                         list(zip(top_ids[i, :k].tolist(), top[i, :k].tolist(), strict=True)))
            for i, token in enumerate(tokens)]
