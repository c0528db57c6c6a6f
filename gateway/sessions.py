"""Session affinity: requests that carry a session key stay on their session's worker.

The key is the first of the configured headers the request carries (the session headers that
coding agents and routers send), else the OpenAI `user` field (`use_user_field`), per model (one
agent session often calls a small and a large model, which different workers may serve). SGLang's
`rid` is no key: it names one request, so it would pin nothing across turns and only fill the table.

A session's first request goes where the policy sends it; later ones go to the same worker while it
is a candidate (routable, below its cap, not already tried by this request) and no more than the load
margin (`session.load_margin`, else the policy's) busier than the least-loaded candidate. Otherwise
the policy chooses among the other candidates, and the session stays on that worker from then on.

The table is bounded: at most `max_sessions` entries (the least recently used goes first) and none
idle longer than `idle_timeout`. Keys are stored as 16-byte digests, so an entry's size does not
depend on what the client sent.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable

import structlog

from .config import SessionConfig
from .policies import Decision, RouteRequest, RoutingPolicy, Worker

log = structlog.get_logger(__name__)


class Sessions:
    # Invariants, kept by _lookup and _pin:
    # - `_workers` is in order of last use (oldest first) and holds at most settings.max_sessions entries;
    # - no entry idle for settings.idle_timeout or longer is ever used (expired ones are dropped from the front).

    def __init__(self, settings: SessionConfig, on_moved: Callable[[str], None] = lambda why: None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings  # replaced whole on a reload
        self.on_moved = on_moved  # called with why ("overloaded" or "unavailable") when a session leaves its worker
        self._clock = clock
        self._workers: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # key → (worker name, last use)

    def __len__(self) -> int:
        return len(self._workers)

    def key(self, headers: Mapping[str, str], body: dict, model: str | None) -> bytes | None:
        """The request's session key (a digest of the model and the key's source and value); None
        when sessions are off or the request names no session."""
        settings = self.settings
        if not settings.enabled:
            return None
        source, value = next((("header", headers[h]) for h in settings.headers if headers.get(h)), (None, None))
        if value is None and settings.use_user_field and isinstance(body.get("user"), str) and body["user"]:
            source, value = "user", body["user"]
        if value is None:
            return None
        return hashlib.blake2b("\0".join((model or "", source, value)).encode(), digest_size=16).digest()

    def choose(self, policy: RoutingPolicy, candidates: list[Worker], request: RouteRequest) -> Decision:
        """The policy's choice, or the request's session's worker while that may keep it."""
        if request.session is None:
            return policy.choose(candidates, request)
        pinned = self._lookup(request.session)
        worker = next((w for w in candidates if w.name == pinned), None)
        margin = policy.load_margin if self.settings.load_margin is None else self.settings.load_margin
        if worker is not None and worker.inflight - min(w.inflight for w in candidates) <= margin:
            decision = policy.place(worker, request, "session")
        else:
            if pinned is not None:
                why = "unavailable" if worker is None else "overloaded"
                self.on_moved(why)
                log.info("gateway.session_moved", worker=pinned, why=why)
            decision = policy.choose([w for w in candidates if w is not worker] or candidates, request)
        self._pin(request.session, decision.worker.name)
        return decision

    def _lookup(self, key: bytes) -> str | None:
        self._expire()
        entry = self._workers.get(key)
        return None if entry is None else entry[0]

    def _pin(self, key: bytes, worker: str) -> None:
        self._workers[key] = (worker, self._clock())
        self._workers.move_to_end(key)
        while len(self._workers) > self.settings.max_sessions:
            self._workers.popitem(last=False)

    def _expire(self) -> None:
        oldest = self._clock() - self.settings.idle_timeout
        while self._workers:
            key, (_, used) = next(iter(self._workers.items()))
            if used > oldest:
                break
            del self._workers[key]
