"""The gateway's Prometheus metrics (`sglang_gw_` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .health import Breaker, State


class Children(dict):
    """A metric's children by their label values, each made once: prometheus_client's `labels()` takes a
    lock and checks its arguments on every call, which the request path would pay several times a request."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def __missing__(self, labels: tuple) -> object:
        child = self[labels] = self.metric.labels(*labels)
        return child


_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sglang_gw_requests", "worker answers relayed, by path, status and worker",
                                ["path", "status", "worker"], registry=r)
        self.responses = Counter("sglang_gw_responses", "proxied requests by path and the status the client got: "
                                 "the engine's, or the gateway's own refusal (queue full, no worker ready, every "
                                 "attempt failed, bad input); 499 when the client left first", ["path", "status"],
                                 registry=r)
        self.latency = Histogram("sglang_gw_request_seconds", "request duration at the gateway", ["path"],
                                 buckets=_BUCKETS, registry=r)
        self.ttfb = Histogram("sglang_gw_time_to_first_byte_seconds", "time to the first relayed response byte",
                              ["path"], buckets=_BUCKETS, registry=r)
        self.inflight = Gauge("sglang_gw_inflight_requests", "requests in flight per worker", ["worker"], registry=r)
        self.queued = Gauge("sglang_gw_queued_requests", "requests waiting at the gateway for a worker below its "
                            "concurrency cap (max_inflight_per_worker)", registry=r)
        self.decisions = Counter("sglang_gw_routing_decisions", "routing decisions by reason", ["reason"], registry=r)
        self.retries = Counter("sglang_gw_retries", "requests re-sent to another worker", registry=r)
        self.client_disconnects = Counter("sglang_gw_client_disconnects", "streams whose client went away before "
                                          "their end (a normal ending, not an error)", registry=r)
        self.relay_requests = Counter("sglang_gw_relay_requests", "proxied requests by the relay process that "
                                      "served them (gateway.processes > 1)", ["relay"], registry=r)
        self.failovers = Counter("sglang_gw_failovers", "generations continued on another worker after theirs "
                                 "failed mid-answer", registry=r)
        self.predicted_prefix = Counter("sglang_gw_predicted_prefix_bytes",
                                        "prefix bytes the policy expected the chosen worker to have cached",
                                        registry=r)
        # Per worker, over the answers that report usage (gateway/cache_prediction.py): their sum is the fleet's.
        self.predicted_cached = Counter("sglang_gw_predicted_cached_tokens",
                                        "cached prompt tokens routing predicted for answers that report usage",
                                        ["worker"], registry=r)
        self.reported_cached = Counter("sglang_gw_reported_cached_tokens",
                                       "cached prompt tokens the engines reported (JSON answers, and streams whose "
                                       "last event carries usage)", ["worker"], registry=r)
        self.cache_payoff = Gauge("sglang_gw_cache_prediction_payoff", "reported / predicted cached tokens over "
                                  "the worker's window of predicted hits", ["worker"], registry=r)
        self.cache_distrusted = Gauge("sglang_gw_cache_prediction_distrusted", "1 while the worker's predicted "
                                      "hits are not paying off and its prefix matches draw no requests", ["worker"],
                                      registry=r)
        self.bytes_per_token = Gauge("sglang_gw_bytes_per_token", "routing-text bytes per prompt token, learned "
                                     "per worker", ["worker"], registry=r)
        self.sessions = Gauge("sglang_gw_sessions", "sessions the gateway keeps on a worker", registry=r)
        self.session_moves = Counter("sglang_gw_session_moves", "sessions moved off their worker, by why",
                                     ["why"], registry=r)
        self.worker_state = Gauge("sglang_gw_worker_state", "1 for the worker's current state", ["worker", "state"],
                                  registry=r)
        self.worker_breaker = Gauge("sglang_gw_worker_breaker", "1 for the state of the worker's circuit breaker",
                                    ["worker", "state"], registry=r)
        # The request path's metrics, by label values.
        (self.requests_by, self.responses_by, self.latency_by, self.ttfb_by, self.decisions_by,
         self.reported_cached_by, self.predicted_cached_by, self.relay_requests_by) = map(Children, (
            self.requests, self.responses, self.latency, self.ttfb, self.decisions, self.reported_cached,
            self.predicted_cached, self.relay_requests))
        self.prefix_index_bytes = Gauge("sglang_gw_prefix_index_bytes", "text bytes tracked per worker",
                                        ["worker"], registry=r)

    def render(self, workers, policy, sessions, cache_ledger, queued: int) -> bytes:
        """The exposition, with the gauges set from the fleet now. The per-worker gauges are rebuilt from
        `workers` alone, so a removed worker's go and sums over workers (an autoscaler's) count only the
        fleet; its counters stay: they are history, and rate() ends with them."""
        self.sessions.set(len(sessions))
        self.queued.set(queued)
        distrusted = cache_ledger.distrusted()
        for gauge in (self.inflight, self.worker_state, self.worker_breaker, self.prefix_index_bytes,
                      self.cache_distrusted, self.cache_payoff, self.bytes_per_token):
            gauge.clear()
        for w in workers:
            self.inflight.labels(w.name).set(w.inflight)
            for state in State:
                self.worker_state.labels(w.name, state.value).set(1 if w.health.state is state else 0)
            breaker = w.health.breaker
            for state in Breaker:
                self.worker_breaker.labels(w.name, state.value).set(1 if breaker is state else 0)
            self.prefix_index_bytes.labels(w.name).set(policy.tracked_bytes(w))
            self.cache_distrusted.labels(w.name).set(1 if w.name in distrusted else 0)
            for gauge, value in ((self.cache_payoff, cache_ledger.payoff(w.name)),
                                 (self.bytes_per_token, cache_ledger.bytes_per_token(w.name))):
                gauge.labels(w.name).set(float("nan") if value is None else value)  # NaN: nothing learned yet
        return generate_latest(self.registry)
