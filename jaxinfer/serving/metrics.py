"""Prometheus metrics of one server, named after vLLM's (`vllm:` -> `jaxinfer:`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `_created` series beside every counter, as vLLM does

# Seconds; the same spread vLLM uses, from sub-millisecond steps to minute-long requests.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)


# The metric families of each registry, by name (prometheus_client refuses a name twice).
_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, dict] = weakref.WeakKeyDictionary()


def count_error(registry: CollectorRegistry, status: int) -> None:
    """Counts an error answered before any model was chosen (an unknown model, a bad body):
    model_name and model_version are empty. Needs a Metrics on `registry` first."""
    errors = _FAMILIES[registry]["request_errors"]
    errors.labels(model_name="", model_version="", code=str(status)).inc()


class Metrics:
    """Counters, gauges and histograms of one model version, every series labelled with
    `model_name` and `model_version`. Several models (and the versions a weight update
    brings) share one registry, so one /metrics page shows them all: pass `registry`."""

    def __init__(self, model_name: str, model_version: str = "1",
                 registry: CollectorRegistry | None = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        labels = {"model_name": model_name, "model_version": model_version}
        families = _FAMILIES.setdefault(registry, {})

        def family(kind, name, doc, labelnames, **kwargs):
            # One family per name and registry; each Metrics adds its own labelled children.
            if name not in families:
                families[name] = kind(f"jaxinfer:{name}", doc, labelnames, registry=registry,
                                      **kwargs)
            return families[name]

        def counter(name, doc, extra=()):
            return family(Counter, name, doc, [*labels, *extra])

        def histogram(name, doc, buckets):
            return family(Histogram, name, doc, list(labels), buckets=buckets).labels(**labels)

        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.").labels(**labels)
        self.generation_tokens = counter(
            "generation_tokens", "Generated tokens."
        ).labels(**labels)
        self._request_success = counter(
            "request_success", "Finished requests by finish reason.", ["finished_reason"]
        )
        # vLLM's prefix-cache counters, in tokens: looked up at admission, and found cached.
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(**labels)
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens whose KV pages came from the prefix cache."
        ).labels(**labels)
        self.preemptions = counter(
            "num_preemptions", "Requests preempted because KV pages ran out."
        ).labels(**labels)
        # vLLM's speculative decoding counters: per slot and step with a draft, its tokens,
        # and the drafts the model accepted (also by their place in the draft, from 0).
        self.spec_decode_num_drafts = counter(
            "spec_decode_num_drafts", "Slot steps that verified a draft.").labels(**labels)
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed.").labels(**labels)
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted.").labels(**labels)
        self._spec_accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by position.",
            ["position"])
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between successive generated tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", _E2E_BUCKETS
        )
        self.requests = counter(
            "requests", "Requests received for this model (completions and chat)."
        ).labels(**labels)
        self._request_errors = counter(
            "request_errors", "Error responses (4xx and 5xx) by HTTP status code.", ["code"]
        )
        self._blocked = counter(
            "requests_blocked", "Requests refused by input screening, by reason.", ["reason"]
        )
        self._precision = counter(
            "precision_requests", "Requests under a precision route, by the class asked for "
            "and the copy that served them.", ["asked", "precision"]
        )
        self._labels = labels
        self._gauges = {
            name: family(Gauge, name, doc, list(labels)).labels(**labels)
            for name, doc in (
                ("num_requests_running", "Requests in decode slots."),
                ("num_requests_waiting", "Requests in the waiting queue."),
                ("kv_cache_usage_perc", "Fraction of KV cache pages in use (0 to 1)."),
                ("host_kv_cache_pages", "Evicted KV pages kept in host memory."),
                ("host_kv_cache_bytes", "Bytes of the evicted KV pages kept in host memory."),
            )
        }

    def speculated(self, counts) -> None:
        """Adds one engine call's counts (Engine.last_speculation): steps with a draft, draft
        tokens, accepted tokens, then accepted drafts per position."""
        drafts, tokens, accepted, *per_position = (int(c) for c in counts)
        self.spec_decode_num_drafts.inc(drafts)
        self.spec_decode_num_draft_tokens.inc(tokens)
        self.spec_decode_num_accepted_tokens.inc(accepted)
        for position, n in enumerate(per_position):
            self._spec_accepted_per_pos.labels(**self._labels, position=str(position)).inc(n)

    def finished(self, reason: str) -> None:
        """Counts one finished request ("stop", "length" or "abort")."""
        self._request_success.labels(**self._labels, finished_reason=reason).inc()

    def error(self, status: int) -> None:
        """Counts one error response with HTTP status `status`."""
        self._request_errors.labels(**self._labels, code=str(status)).inc()

    def blocked(self, reason: str) -> None:
        """Counts one request that input screening refused for `reason`."""
        self._blocked.labels(**self._labels, reason=reason).inc()

    def precision(self, asked: str, served: str) -> None:
        """Counts one request that asked for precision `asked` and was served by `served`."""
        self._precision.labels(**self._labels, asked=asked, precision=served).inc()

    def retire(self) -> None:
        """Drops this version's gauges (their callables hold its engine); its counters and
        histograms stay, as Prometheus expects of counters."""
        for name, gauge in self._gauges.items():
            gauge.set_function(lambda: 0.0)  # whoever still holds these Metrics
            _FAMILIES[self.registry][name].remove(*self._labels.values())

    def watch(self, running: Callable[[], float], waiting: Callable[[], float],
              kv_usage: Callable[[], float]) -> None:
        """Gauges read these callables at every scrape."""
        self._gauges["num_requests_running"].set_function(running)
        self._gauges["num_requests_waiting"].set_function(waiting)
        self._gauges["kv_cache_usage_perc"].set_function(kv_usage)

    def watch_host_tier(self, pages: Callable[[], float], nbytes: Callable[[], float]) -> None:
        """The host tier's gauges read these callables at every scrape."""
        self._gauges["host_kv_cache_pages"].set_function(pages)
        self._gauges["host_kv_cache_bytes"].set_function(nbytes)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

