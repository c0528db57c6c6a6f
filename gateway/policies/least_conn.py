from __future__ import annotations

from .base import Decision, RouteRequest, RoutingPolicy, Worker


class LeastConn(RoutingPolicy):
    """nginx's least_conn: the worker with the fewest requests in flight (random among equals)."""

    name = "least_conn"

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        return Decision(self.least_loaded(candidates), self.name)
