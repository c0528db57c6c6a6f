"""Cache-aware routing, bounded by the *candidate's* load (see docs/routing.md).

1. Match the request's text against each candidate's prefix index.
2. Hit (the longest match covers at least `min_match_ratio` of the text): among the workers sharing
   that longest match, the least loaded — unless it is more than `load_margin` requests busier than
   the least-loaded worker of all, in which case locality yields (`load_guard`).
3. Miss: the least-loaded worker; among equals, the one holding the fewest prefix bytes, so that new
   tenants spread cache footprint as well as load.
The text is then recorded for the chosen worker.
"""

from __future__ import annotations

from ..prefix_index import PrefixIndex
from .base import Decision, RouteRequest, RoutingPolicy, Worker


class PrefixAffinity(RoutingPolicy):
    name = "prefix_affinity"

    def __init__(self, seed: int | None = None, *, block_size: int = 64, max_bytes_per_worker: int = 64 << 20,
                 min_match_ratio: float = 0.3, load_margin: int = 4):
        super().__init__(seed)
        if not 0 <= min_match_ratio <= 1 or load_margin < 0:
            raise ValueError("min_match_ratio must be in [0, 1] and load_margin >= 0")
        self.index = PrefixIndex(block_size, max_bytes_per_worker)
        self.min_match_ratio = min_match_ratio
        self.load_margin = load_margin

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        chain = self.index.chain(request.text)
        matched = {w.name: self.index.match(chain, w.name) for w in candidates}
        best = max(matched.values())
        idlest = self.least_loaded(candidates, tiebreak=lambda w: self.index.bytes_of(w.name))
        total = len(request.text.encode())
        if best > 0 and best >= self.min_match_ratio * total:
            holder = self.least_loaded([w for w in candidates if matched[w.name] == best])
            if holder.inflight - idlest.inflight <= self.load_margin:
                decision = Decision(holder, "cache_hit", best)
            else:
                decision = Decision(idlest, "load_guard", matched[idlest.name])
        else:
            decision = Decision(idlest, "miss", matched[idlest.name])
        self.index.insert(chain, decision.worker.name)
        return decision

    def retune(self, *, block_size: int, max_bytes_per_worker: int, min_match_ratio: float,
               load_margin: int) -> bool:
        # The thresholds change in place; a new block size or budget needs a new index.
        if (block_size, max_bytes_per_worker) != (self.index.block_size, self.index.max_bytes):
            return False
        self.min_match_ratio, self.load_margin = min_match_ratio, load_margin
        return True

    def forget(self, worker: Worker) -> None:
        self.index.forget(worker.name)

    def tracked_bytes(self, worker: Worker) -> int:
        return self.index.bytes_of(worker.name)
