"""One worker's health as the gateway sees it: a state machine, a circuit breaker and an operator's hold.

The gateway only reports events (a probe's result, a connect error, an answer's status, a broken
stream, the stall watchdog's look, the supervisor's exit/restart/admit, a drain); this class owns
every transition and logs it from one place per machine (`_set_state`, `_set_breaker`).

State (is the process there and answering?):

    starting ──probe failed──▶ unhealthy          (no on_hung: it never served)
    starting/unhealthy ──success_threshold probes ok, no stall──▶ ready
    any but dead ──admit (the supervisor saw /health 200)──▶ ready
    ready ──failure_threshold probes failed, or a stall──▶ unhealthy + on_hung(name, why)
    any but dead ──connect error, broken stream──▶ unhealthy
    any ──exited──▶ dead ──restarted──▶ starting  (nothing else leaves dead: probes never re-admit it)

Breaker (do its requests succeed?), independent of the state and of the probes:

    closed ──breaker_threshold failures in a row (connect error, 5xx, broken stream)──▶ open
    open ──breaker_cooldown elapsed (seen when asked)──▶ half_open
    half_open: one trial request at a time ──success──▶ closed, ──failure──▶ open again
"""

from __future__ import annotations

import enum
import time
from typing import Callable

import structlog

from .config import HealthConfig

log = structlog.get_logger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"  # the supervisor saw the process exit


class Breaker(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Trial:
    """The half-open breaker's one trial request: held by the request that claimed it."""


class WorkerHealth:
    # Invariants, kept by the methods below:
    # - routable ⇔ ready ∧ ¬draining ∧ (breaker closed ∨ (half_open ∧ no trial in flight));
    # - only restarted() leaves dead; only drain() changes `draining`;
    # - on_hung fires once per ready → unhealthy move that probes or a stall caused;
    # - the breaker reaches half_open only from open after the cooldown, and then lets one trial through.

    def __init__(self, name: str, settings: HealthConfig, on_hung: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.settings = settings  # replaced whole on a reload
        self.on_hung = on_hung
        self._clock = clock
        self.state = State.STARTING
        self.draining = False  # an operator's hold: no new requests; probes do not change it
        self.probe_successes = 0  # in a row
        self.probe_failures = 0  # in a row
        self.stalled = False  # the stall watchdog's last look found a stall: probes may not re-admit
        self.last_progress = clock()  # the last byte relayed from the worker (for the stall watchdog)
        self.request_failures = 0  # connect errors, 5xx answers and broken streams in a row
        self._breaker = Breaker.CLOSED
        self._open_until = 0.0
        self._trial: Trial | None = None

    # ---- queries --------------------------------------------------------------------------------------

    @property
    def breaker(self) -> Breaker:
        if self._breaker is Breaker.OPEN and self._clock() >= self._open_until:
            self._set_breaker(Breaker.HALF_OPEN, "cooldown over")
        return self._breaker

    @property
    def routable(self) -> bool:
        if self.state is not State.READY or self.draining:
            return False
        breaker = self.breaker
        return breaker is Breaker.CLOSED or (breaker is Breaker.HALF_OPEN and self._trial is None)

    # ---- probes and the supervisor ---------------------------------------------------------------------

    def probe_ok(self) -> None:
        self.probe_failures, self.probe_successes = 0, self.probe_successes + 1
        if (self.state in (State.STARTING, State.UNHEALTHY) and not self.stalled
                and self.probe_successes >= self.settings.success_threshold):
            self._set_state(State.READY, "probe")

    def probe_failed(self) -> None:
        self.probe_successes, self.probe_failures = 0, self.probe_failures + 1
        if self.state is State.STARTING:
            self._set_state(State.UNHEALTHY, "probe")
        elif self.probe_failures >= self.settings.failure_threshold:
            self._take_out(f"{self.probe_failures} failed probes", hung=True)

    def admit(self) -> None:
        """The supervisor saw the engine answer /health and so did our probe: ready at once."""
        self.probe_failures, self.probe_successes = 0, self.probe_successes + 1
        if self.state is not State.DEAD:
            self._set_state(State.READY, "supervisor")

    def exited(self) -> None:
        self._set_state(State.DEAD, "process exited")

    def restarted(self) -> None:
        """A new process: nothing learned about the old one applies, its breaker included."""
        self.probe_successes = self.probe_failures = self.request_failures = 0
        self.stalled = False
        self.last_progress = self._clock()
        self._set_breaker(Breaker.CLOSED, "process restarted")
        self._set_state(State.STARTING, "process restarted")

    def drain(self, draining: bool) -> None:
        if draining != self.draining:
            self.draining = draining
            log.info("gateway.worker_draining" if draining else "gateway.worker_undrained", worker=self.name)

    # ---- requests --------------------------------------------------------------------------------------

    def request_started(self) -> Trial | None:
        """A request was routed here; it holds the half-open breaker's trial when it returns one."""
        self.last_progress = self._clock()  # an idle worker's old timestamp is no stall
        if self.breaker is Breaker.HALF_OPEN and self._trial is None:
            self._trial = Trial()
            return self._trial
        return None

    def request_ended(self, trial: Trial | None) -> None:
        """A trial that got no verdict (say, the client left first) lets the next request try."""
        if trial is not None and trial is self._trial:
            self._trial = None

    def progress(self) -> None:
        self.last_progress = self._clock()

    def response(self, status: int) -> None:
        """The worker answered: a 5xx counts against the breaker, anything else closes it."""
        if status >= 500:
            self._request_failed(f"status {status}")
        else:
            self.request_failures = 0
            if self.breaker is Breaker.HALF_OPEN:
                self._set_breaker(Breaker.CLOSED, f"trial answered {status}")

    def connect_error(self, why: str) -> None:
        """Out at once (a probe re-admits it), and one failure for the breaker."""
        self.probe_successes = 0
        self._take_out(why, hung=False)
        self._request_failed(why)

    def stream_failed(self, why: str) -> None:
        self.connect_error(why)  # the connection broke mid-answer: the same evidence

    def check_stall(self, inflight: int) -> None:
        """The watchdog's look: requests in flight but no byte for stall_timeout mean a hang."""
        quiet = self._clock() - self.last_progress
        self.stalled = inflight > 0 and quiet > self.settings.stall_timeout
        if self.stalled:
            self.probe_successes = 0
            self._take_out(f"no bytes for {quiet:.1f}s with {inflight} in flight", hung=True)

    # ---- the transitions -------------------------------------------------------------------------------

    def _take_out(self, why: str, hung: bool) -> None:
        if self.state is State.DEAD:
            return
        was_ready = self.state is State.READY
        self._set_state(State.UNHEALTHY, why)
        if hung and was_ready and self.on_hung is not None:
            self.on_hung(self.name, why)  # the supervisor kills and restarts its own hung engines

    def _request_failed(self, why: str) -> None:
        breaker = self.breaker
        if breaker is Breaker.HALF_OPEN:
            self._open(f"trial failed: {why}")
        elif breaker is Breaker.CLOSED:
            self.request_failures += 1
            if self.request_failures >= self.settings.breaker_threshold:
                self._open(f"{self.request_failures} failures in a row, the last: {why}")
        # open: requests sent before it opened; the cooldown runs its course

    def _open(self, why: str) -> None:
        self.request_failures = 0
        self._open_until = self._clock() + self.settings.breaker_cooldown
        self._set_breaker(Breaker.OPEN, why, seconds=self.settings.breaker_cooldown)

    def _set_state(self, new: State, why: str) -> None:
        if new is not self.state:
            log.info("gateway.worker_state", worker=self.name, old=self.state.value, new=new.value, why=why)
            self.state = new

    def _set_breaker(self, new: Breaker, why: str, **details) -> None:
        self._trial = None  # every move ends the trial's turn
        if new is not self._breaker:
            level = log.warning if new is Breaker.OPEN else log.info
            level("gateway.circuit", worker=self.name, old=self._breaker.value, new=new.value, why=why, **details)
            self._breaker = new
