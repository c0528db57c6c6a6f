"""Routing policies, one per file behind `RoutingPolicy`, chosen by name in the config."""

from __future__ import annotations

from .base import Blocks, Decision, RouteRequest, RoutingPolicy, Worker
from .least_conn import LeastConn
from .power_of_two import PowerOfTwo
from .prefix_affinity import PrefixAffinity
from .round_robin import RoundRobin

POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RoundRobin, LeastConn, PowerOfTwo, PrefixAffinity)}


def create_policy(name: str, seed: int | None = None, **options) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy: unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](seed, **options)


__all__ = ["POLICIES", "Blocks", "Decision", "RouteRequest", "RoutingPolicy", "Worker", "create_policy"]
