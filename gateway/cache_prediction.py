"""Predicted vs reported cached tokens: does cache-aware routing pay off, worker by worker?

The policy predicts how much of a prompt the chosen worker holds in its cache, in bytes of routing
text (`Decision.matched_bytes`); the engine reports, in its answer's usage, how many prompt tokens it
served from its cache. Bytes become tokens by each worker's bytes-per-token ratio, learned from its
answers (the prompt's bytes over the prompt tokens the engine reports) as a ratio of decayed sums, so
that it follows the traffic's mix of languages and templates. Until a worker's first answer has
taught it, nothing is predicted for it. Tokenizing would be exact, but it costs a tokenization per
request on the gateway's event loop (and the tokenizer is on this host only for local engines); the
ratio costs a division.

Usage is read where it is cheap: a JSON answer's `usage` / `meta_info`, and in a stream the last event
that carries data: the usage chunk of an OpenAI stream with `stream_options.include_usage`, the final
meta_info of a /generate stream. A stream without usage reports nothing, and a batch's list answer is
left out (its usage sums prompts whose routing text was only their common prefix).

The gap is used: when, over a worker's last `window` predicted hits, its engine reported less than
`min_ratio` of the tokens predicted, the index is claiming a cache the engine no longer has (a KV pool
smaller than the index's budget, a flush). The worker is then distrusted for `cooldown` seconds: its
prefix matches draw no requests (prefix_affinity places those by load), and its window starts afresh.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import orjson
import structlog

from .config import CachePredictionConfig
from .policies import Decision

log = structlog.get_logger(__name__)

# Weight each answer keeps in a worker's bytes-per-token sums per later answer: the ratio follows a
# change of traffic within tens of answers, and one odd prompt moves it little.
RATIO_DECAY = 0.9


@dataclass(slots=True)  # not frozen: made per answer (policies/base.py says why)
class Usage:
    prompt_tokens: int
    cached_tokens: int


def answer_usage(body: bytes) -> Usage | None:
    """The usage of one JSON answer: OpenAI's `usage` (with `prompt_tokens_details.cached_tokens`) or
    SGLang's `meta_info`; None when it reports none (an error, a batch's list, another server)."""
    if b'"prompt_tokens"' not in body:  # no usage to read: skip the parse
        return None
    try:
        data = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    usage = data.get("usage") or data.get("meta_info")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else usage.get("cached_tokens")
    prompt = usage.get("prompt_tokens")
    if not (isinstance(prompt, int) and isinstance(cached, int)):
        return None
    return Usage(prompt, cached)


def stream_usage(events: bytes) -> Usage | None:
    """The usage in the last data event of `events` (a stream's last events carrying data)."""
    start = events.rfind(b"data: {")
    if start < 0:
        return None
    end = events.find(b"\n\n", start)
    return answer_usage(events[start + len(b"data: "):end if end >= 0 else None])


class _WorkerRecord:
    def __init__(self, window: int):
        self.text_bytes = 0.0  # decayed sums of prompt bytes and prompt tokens: their ratio is bytes/token
        self.prompt_tokens = 0.0
        self.hits: deque[tuple[int, int]] = deque(maxlen=window)  # (predicted, reported) of predicted hits
        self.distrusted_until = 0.0

    def bytes_per_token(self) -> float | None:
        return self.text_bytes / self.prompt_tokens if self.prompt_tokens else None

    def totals(self) -> tuple[int, int]:
        """(predicted, reported) cached tokens over the window."""
        return sum(p for p, _ in self.hits), sum(r for _, r in self.hits)


class CacheLedger:
    # Invariant: a worker is distrusted ⇔ now < its distrusted_until; its window holds only hits
    # recorded since it was last distrusted.

    def __init__(self, settings: CachePredictionConfig, clock: Callable[[], float] = time.monotonic):
        self.settings = settings  # replaced whole on a reload (a new window length applies from the next hit)
        self._clock = clock
        self._workers: dict[str, _WorkerRecord] = {}
        self._distrusted: frozenset[str] = frozenset()

    def record(self, decision: Decision, usage: Usage) -> int | None:
        """Book an answer's reported usage against its decision; the tokens predicted cached (None when
        the decision predicted nothing that can be checked: no prompt bytes, or no ratio yet)."""
        record = self._workers.get(decision.worker.name)
        if record is None or record.hits.maxlen != self.settings.window:
            record = self._workers[decision.worker.name] = self._renewed(record)
        if decision.prompt_bytes <= 0 or usage.prompt_tokens <= 0:
            return None
        ratio = record.bytes_per_token()  # before this answer teaches it: a prediction it did not see
        record.text_bytes = record.text_bytes * RATIO_DECAY + decision.prompt_bytes
        record.prompt_tokens = record.prompt_tokens * RATIO_DECAY + usage.prompt_tokens
        if ratio is None:
            return None
        predicted = min(round(decision.matched_bytes / ratio), usage.prompt_tokens)
        if predicted > 0 and self.settings.window:
            record.hits.append((predicted, usage.cached_tokens))
            self._judge(decision.worker.name, record)
        return predicted

    def _renewed(self, old: _WorkerRecord | None) -> _WorkerRecord:
        record = _WorkerRecord(self.settings.window)
        if old is not None:  # the window's length changed: the ratio and any distrust carry over
            record.text_bytes, record.prompt_tokens = old.text_bytes, old.prompt_tokens
            record.distrusted_until = old.distrusted_until
        return record

    def _judge(self, worker: str, record: _WorkerRecord) -> None:
        if len(record.hits) < self.settings.window:
            return
        predicted, reported = record.totals()
        if reported < self.settings.min_ratio * predicted:
            record.distrusted_until = self._clock() + self.settings.cooldown
            record.hits.clear()
            self._distrusted = self._distrusted | {worker}
            log.warning("gateway.cache_predictions_unpaid", worker=worker, predicted=predicted, reported=reported,
                        cooldown=self.settings.cooldown)

    def distrusted(self) -> frozenset[str]:
        """The workers whose predicted hits have not paid off lately (usually none: then this is cheap)."""
        if self._distrusted:
            now = self._clock()
            trusted = {w for w in self._distrusted if now >= self._workers[w].distrusted_until}
            if trusted:
                self._distrusted -= trusted
                log.info("gateway.cache_predictions_trusted", workers=sorted(trusted))
        return self._distrusted

    def payoff(self, worker: str) -> float | None:
        """Reported over predicted cached tokens across the worker's window so far (None: no hits yet)."""
        record = self._workers.get(worker)
        if record is None or not record.hits:
            return None
        predicted, reported = record.totals()
        return reported / predicted

    def bytes_per_token(self, worker: str) -> float | None:
        record = self._workers.get(worker)
        return None if record is None else record.bytes_per_token()
