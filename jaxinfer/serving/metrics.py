"""Prometheus metrics of one server, named after vLLM's (`vllm:` -> `jaxinfer:`)."""

from __future__ import annotations

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


class Metrics:
    """Counters, gauges and histograms in their own registry (one per server)."""

    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def counter(name, doc, extra=()):
            return Counter(f"jaxinfer:{name}", doc, [*labels, *extra], registry=registry)

        def histogram(name, doc, buckets):
            metric = Histogram(f"jaxinfer:{name}", doc, list(labels), registry=registry,
                               buckets=buckets)
            return metric.labels(**labels)

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
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between successive generated tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", _E2E_BUCKETS
        )
        self._labels = labels
        self._gauges = {
            name: Gauge(f"jaxinfer:{name}", doc, list(labels), registry=registry).labels(**labels)
            for name, doc in (
                ("num_requests_running", "Requests in decode slots."),
                ("num_requests_waiting", "Requests in the waiting queue."),
                ("kv_cache_usage_perc", "Fraction of KV cache pages in use (0 to 1)."),
                ("host_kv_cache_pages", "Evicted KV pages kept in host memory."),
                ("host_kv_cache_bytes", "Bytes of the evicted KV pages kept in host memory."),
            )
        }

    def finished(self, reason: str) -> None:
        """Counts one finished request ("stop", "length" or "abort")."""
        self._request_success.labels(**self._labels, finished_reason=reason).inc()

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

