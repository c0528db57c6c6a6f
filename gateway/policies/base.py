"""The routing interface: a policy picks one of the candidate workers for a request and says why."""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property


@dataclass
class Worker:
    """What routing knows of an engine: its name and the gateway's own count of requests in flight."""

    name: str
    url: str
    inflight: int = 0


# The per-request messages below are plain dataclasses, not frozen ones, though nothing changes them
# once made: a frozen dataclass's __init__ sets each field through object.__setattr__, ~4x the cost,
# paid on every request.
@dataclass
class RouteRequest:
    text: str  # the prompt as the engine will see it (chat: the rendered template when available)
    session: bytes | None = None  # the session key (gateway/sessions.py); None: no session
    batch: bool = False  # several prompts: `text` is only what they share
    # Workers whose predicted cache hits have not paid off lately (gateway/cache_prediction.py): their
    # prefix matches draw no requests until they are trusted again.
    distrusted: frozenset[str] = frozenset()
    # Sent by a relay instead of the text (gateway/relay.py): its block chain, so that the hashing of long
    # prompts runs in the relays, side by side, and not in the one gateway process they all share.
    blocks: Blocks | None = None

    @cached_property
    def text_bytes(self) -> int:
        return len(self.text.encode()) if self.blocks is None else self.blocks.text_bytes


@dataclass(slots=True)
class Blocks:
    """A text's prefix-index chain (prefix_index.block_chain), made where the text is."""

    block_size: int
    chain: list[int]
    text_bytes: int


@dataclass(slots=True)
class Decision:
    worker: Worker
    reason: str  # e.g. cache_hit, miss, load_guard, distrusted, session, round_robin, least_conn, power_of_two
    matched_bytes: int = 0  # prefix bytes the policy expects the worker to have cached
    # The prompt's bytes, set where matched_bytes is a prediction to check against the engine's report
    # (a single prompt); 0 otherwise.
    prompt_bytes: int = 0


class RoutingPolicy(ABC):
    name: str
    # Requests a worker may be busier than the least-loaded candidate before locality yields to load:
    # a cached prefix's (prefix_affinity's `load_margin` option) and a session's (gateway/sessions.py).
    # 6: at 4, with tight caches, conversations moved by the guard cost up to 6 points of hit rate
    # where extra load is cheap (a GPU's batch), and 6 spreads a burst as well (docs/routing.md).
    load_margin: int = 6
    # The block size of the policy's prefix index, where it has one: `choose` then reads the request's text,
    # as its block chain only, which a relay sends instead of the text (RouteRequest.blocks).
    block_size: int | None = None

    @property
    def uses_text(self) -> bool:
        """Whether `choose` reads the request's text: the request path renders it only then."""
        return self.block_size is not None

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The config options the policy takes: its keyword-only constructor arguments (`policy.*`)."""
        return frozenset(p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY)

    @abstractmethod
    def choose(self, candidates: list[Worker], request: RouteRequest) -> Decision:
        """candidates: the ready workers serving the request's model (never empty)."""

    def place(self, worker: Worker, request: RouteRequest, reason: str) -> Decision:
        """The request goes to `worker`, chosen outside the policy (its session's): remember it as the
        policy remembers its own choices."""
        return Decision(worker, reason)

    def forget(self, worker: Worker) -> None:
        """The worker restarted or left: drop whatever the policy remembers about it."""

    def retune(self, **options) -> bool:
        """Apply new options in place (a config reload); False when only a fresh policy can take them."""
        return not options

    def tracked_bytes(self, worker: Worker) -> int:
        """Prefix bytes the policy remembers for the worker (0 for policies without an index)."""
        return 0

    def least_loaded(self, workers: list[Worker], tiebreak=lambda w: 0) -> Worker:
        # Random among equals, so that an idle fleet does not pile onto the first worker listed.
        return min(workers, key=lambda w: (w.inflight, tiebreak(w), self.rng.random()))
