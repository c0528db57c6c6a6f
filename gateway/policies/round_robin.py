from __future__ import annotations

import itertools

from .base import Decision, RouteRequest, RoutingPolicy, Worker


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self, seed: int | None = None):
        super().__init__(seed)
        self._turn = itertools.count()

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        return Decision(candidates[next(self._turn) % len(candidates)], self.name)
