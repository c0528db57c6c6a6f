"""Cache-aware routing, bounded by the *candidate's* load (see docs/routing.md).

1. Match the request's text against each candidate's prefix index.
2. Hit (the longest match covers at least `min_match_ratio` of the text): among the workers sharing
   that longest match, the least loaded — unless it is more than `load_margin` requests busier than
   the least-loaded worker of all, in which case locality yields (`load_guard`) and the request is
   placed as a miss is. A conversation moved this way stays: its new worker now holds its longest prefix.
3. Miss: where the new prefix fits — among the workers within `load_margin` of the least loaded, the
   one holding the fewest prefix bytes, so that tenants spread cache footprint as well as load (the
   least-loaded worker alone would hand a tight cache a third of the tenants: docs/routing.md, 11).
A distrusted worker's matches (its engine's reported cached tokens fell far short of what the index
predicted: gateway/cache_prediction.py) count for nothing in 2, so its prefixes go by load
(`distrusted` when that changed the choice). The text is then recorded for the chosen worker.
"""

from __future__ import annotations

from ..prefix_index import PrefixIndex
from .base import Decision, RouteRequest, RoutingPolicy, Worker


class PrefixAffinity(RoutingPolicy):
    name = "prefix_affinity"

    def __init__(self, seed: int | None = None, *, block_size: int = 64, max_bytes_per_worker: int = 64 << 20,
                 min_match_ratio: float = 0.3, load_margin: int = RoutingPolicy.load_margin):
        super().__init__(seed)
        if not 0 <= min_match_ratio <= 1 or load_margin < 0:
            raise ValueError("min_match_ratio must be in [0, 1] and load_margin >= 0")
        self.index = PrefixIndex(block_size, max_bytes_per_worker)
        self.min_match_ratio = min_match_ratio
        self.load_margin = load_margin

    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        chain = self._chain(request)
        least = min([w.inflight for w in candidates])
        if not chain:  # shorter than a block: nothing to match, nothing to record (most short requests)
            return self._record(chain, self._roomiest(candidates, least), "miss", 0, request)
        matched = {w.name: self.index.match(chain, w.name) for w in candidates}
        trusted = {name: 0 if name in request.distrusted else n for name, n in matched.items()} \
            if request.distrusted else matched
        best = self._hit(trusted, request)
        if best:
            holder = self.least_loaded([w for w in candidates if trusted[w.name] == best])
            if holder.inflight - least <= self.load_margin:
                worker, reason = holder, "cache_hit"
            else:
                worker, reason = self._roomiest(candidates, least), "load_guard"
        else:
            worker = self._roomiest(candidates, least)
            reason = "distrusted" if trusted is not matched and self._hit(matched, request) else "miss"
        return self._record(chain, worker, reason, matched[worker.name], request)

    @property
    def block_size(self) -> int:
        return self.index.block_size

    def _chain(self, request: RouteRequest) -> list[int]:
        if request.blocks is None:
            return self.index.chain(request.text)
        # A relay's chain, cut at the block size it was told: none other matches this index (a reload changed it).
        return request.blocks.chain if request.blocks.block_size == self.index.block_size else []

    def _roomiest(self, candidates: list[Worker], least: int) -> Worker:
        """Where a new prefix fits: among the workers within the load margin, the one holding the fewest
        prefix bytes, so that tenants spread cache footprint as well as load."""
        return min((w for w in candidates if w.inflight - least <= self.load_margin),
                   key=lambda w: (self.index.bytes_of(w.name), w.inflight, self.rng.random()))

    def place(self, worker: Worker, request: RouteRequest, reason: str) -> Decision:
        chain = self._chain(request)
        return self._record(chain, worker, reason, self.index.match(chain, worker.name), request)

    def _hit(self, matched: dict[str, int], request: RouteRequest) -> int:
        """The longest match when it makes a hit (at least min_match_ratio of the text), else 0."""
        best = max(matched.values())
        return best if best >= self.min_match_ratio * request.text_bytes else 0

    def _record(self, chain: list[int], worker: Worker, reason: str, matched: int,
                request: RouteRequest) -> Decision:
        if chain:
            self.index.insert(chain, worker.name)
        # A batch's text is only what its prompts share: its engine reports tokens of them all.
        return Decision(worker, reason, matched, 0 if request.batch else request.text_bytes)

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
