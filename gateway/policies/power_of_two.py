from __future__ import annotations

from .base import Decision, RouteRequest, RoutingPolicy, Worker


class PowerOfTwo(RoutingPolicy):
    """Two random workers, the less loaded of them: near least-conn balance without herding."""

    name = "power_of_two"

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        pair = self.rng.sample(candidates, 2) if len(candidates) > 1 else candidates
        return Decision(self.least_loaded(pair), self.name)
