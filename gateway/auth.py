"""API keys: stored as SHA-256 hashes only, compared in constant time, with per-key limits.

A key may be limited to some models (403 otherwise), to requests per minute (429 with Retry-After,
over a sliding 60 s window) and to concurrent requests (429).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from ..errors import APIError
from ..serving import presented_key

KEY_PREFIX = "sk-gw-"
WINDOW_S = 60.0


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its hash (only the hash goes into the config)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass
class KeyState:
    name: str
    digest: str
    rpm: int | None
    max_concurrent: int | None
    models: frozenset[str] | None
    recent: deque = field(default_factory=deque)  # admission times inside the rate window
    inflight: int = 0


class Authenticator:
    def __init__(self, keys: list):
        self.keys: list[KeyState] = []
        self.update(keys)

    def update(self, keys: list) -> None:
        """Replace the key list (a reload). A key kept under the same name and hash keeps its rate window
        and in-flight count; requests admitted under a removed key finish undisturbed."""
        old = {(k.name, k.digest): k for k in self.keys}
        fresh = []
        for k in keys:
            models = frozenset(k.models) if k.models is not None else None
            state = old.get((k.name, k.hash)) or KeyState(k.name, k.hash, k.rpm, k.max_concurrent, models)
            # The same object: requests in flight release their slot on the state the key now has.
            state.rpm, state.max_concurrent, state.models = k.rpm, k.max_concurrent, models
            fresh.append(state)
        self.keys = fresh

    def identify(self, request: web.Request) -> KeyState | None:
        """The key's state, or 401. None when no keys are configured (the gateway is open)."""
        if not self.keys:
            return None
        return self.by_digest(hash_key(presented_key(request)))

    def by_digest(self, digest: str | None) -> KeyState | None:
        """The state of the key with this hash, or 401; None when no keys are configured."""
        if not self.keys:
            return None
        found = None
        for state in self.keys:  # every comparison runs: no early exit to time
            if digest is not None and hmac.compare_digest(state.digest, digest):
                found = state
        if found is None:
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return found

    def admit(self, state: KeyState | None, model: str | None) -> contextlib.AbstractContextManager:
        """Checks the key's model list and limits, and holds one concurrency slot while the request runs."""
        return _OPEN if state is None else self._admit(state, model)

    @contextlib.contextmanager
    def _admit(self, state: KeyState, model: str | None):
        if state.models is not None and model is not None and model not in state.models:
            raise APIError(403, f"key {state.name!r} may not use model {model!r}", param="model",
                           code="model_not_allowed")
        now = time.monotonic()
        while state.recent and state.recent[0] <= now - WINDOW_S:
            state.recent.popleft()
        if state.rpm is not None and len(state.recent) >= state.rpm:
            wait = math.ceil(state.recent[0] + WINDOW_S - now)
            raise APIError(429, f"rate limit of {state.rpm} requests per minute reached for key {state.name!r}",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(wait, 1))})
        if state.max_concurrent is not None and state.inflight >= state.max_concurrent:
            raise APIError(429, f"key {state.name!r} already has {state.inflight} requests in flight",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        state.recent.append(now)
        state.inflight += 1
        try:
            yield
        finally:
            state.inflight -= 1


_OPEN = contextlib.nullcontext()  # an open gateway's admission: nothing to check or hold
