"""Prometheus metrics with SGLang's names (`sglang:` prefix, labelled with model_name).

Counters and gauges are read from the engine at scrape time (the scheduler already counts them);
latency histograms are observed by the server as each request finishes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .request import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector:
    def __init__(self, server):
        self.server = server
        self._last = (time.monotonic(), 0)  # for gen_throughput between scrapes

    def collect(self):
        engine = self.server.engine
        if engine is None:
            return
        model = self.server.served_model_name
        stats = engine.scheduler.stats
        now, generated = time.monotonic(), stats.generated_tokens
        then, before = self._last
        self._last = (now, generated)
        gauges = dict(engine.live_stats(), gen_throughput=(generated - before) / max(now - then, 1e-9))
        for name, value in gauges.items():
            g = GaugeMetricFamily(f"sglang:{name}", name.replace("_", " "), labels=["model_name"])
            g.add_metric([model], float(value))
            yield g
        counters = {
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generated_tokens,
            "cached_tokens": stats.cached_tokens,
            "num_requests": stats.finished,
            "num_aborted_requests": stats.aborted,
            **engine.grammar_counts(),
        }
        for name, value in counters.items():
            c = CounterMetricFamily(f"sglang:{name}", name.replace("_", " "), labels=["model_name"])
            c.add_metric([model], float(value))
            yield c


class EngineMetrics:
    def __init__(self, server):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(server))
        self.model = server.served_model_name

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("sglang:time_to_first_token_seconds", "time to first token")
        self.itl = histogram("sglang:inter_token_latency_seconds", "time between output tokens")
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "end-to-end request latency")

    def observe(self, out: RequestOutput) -> None:
        self.e2e.labels(self.model).observe(out.e2e_latency)
        if out.time_to_first_token is not None:
            self.ttft.labels(self.model).observe(out.time_to_first_token)
            if out.completion_tokens > 1:
                gap = (out.e2e_latency - out.time_to_first_token) / (out.completion_tokens - 1)
                self.itl.labels(self.model).observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
