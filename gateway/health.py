"""One worker's health as the gateway sees it: a state machine, a circuit breaker and an operator's hold.

The gateway only reports events (a probe's result, a connect error, an answer's status, a broken
stream, the stall watchdog's look, the supervisor's look at a local engine's process, its
exit/restart/admit, a drain); this class owns every transition and logs it from one place per
machine (`_set_state`, `_set_breaker`).

Busy is not hung (issue 12): a probe that times out says only that the worker's event loop is slow
or gone, so by itself it never makes a worker hung. Hung takes evidence of no progress: the engine's
own heartbeat (work, but no finished step for hang_timeout), its process stopped (SIGSTOP), answers
that say it cannot serve, or silence: probes timing out and nothing at all heard from it (no probe
answered, no byte relayed) for hang_timeout, as from an event loop that is deadlocked. A loaded
engine answers late, or streams meanwhile: it is never silent that long.

State (is the process there and answering?):

    starting ──probe failed──▶ unhealthy          (no on_hung: it never served)
    starting/unhealthy ──success_threshold probes ok, no stall, scheduler progressing──▶ ready
    any but dead ──admit (the supervisor saw /health 200)──▶ ready
    ready ──failure_threshold probes failed (answered, not 200; or refused)──▶ unhealthy, hung
    any but dead ──a probe: the scheduler has work and no step for hang_timeout──▶ unhealthy, hung
    any but dead ──process stopped──▶ unhealthy; still stopped failure_threshold looks in a row: hung
    any but dead ──failure_threshold probes timed out and no byte from it meanwhile──▶ unhealthy (not hung)
    any but dead ──probes timed out and nothing heard from it for hang_timeout──▶ unhealthy, hung
    any but dead ──connect error, broken stream, stall──▶ unhealthy (not hung)
    any ──exited──▶ dead ──restarted──▶ starting  (nothing else leaves dead: probes never re-admit it)

Hung: on_hung(name, why) fires, once until the worker is ready again (the supervisor kills and
restarts its own engines; a remote worker is only logged).

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
    # - hung ⇒ state is unhealthy or dead: on_hung fires once per hang, and `hung` clears only on ready or restarted();
    # - a stall or a connect error never makes a worker hung, nor does a timed-out probe while anything
    #   (a probe's answer, a relayed byte) was heard from the worker within hang_timeout;
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
        self.probe_failures = 0  # answered but not 200, or refused: in a row
        self.probe_timeouts = 0  # in a row
        # When the last failure_threshold of those timed-out probes were sent (the window they cover).
        self.timed_out_sent: list[float] = []
        self.stopped_looks = 0  # the supervisor found the process stopped: in a row
        self.hung = False  # on_hung fired for this hang
        self.stalled = False  # the stall watchdog's last look found a stall: probes may not re-admit
        self.last_progress = clock()  # the last byte relayed or request routed (the stall watchdog's clock)
        self.last_heard = clock()  # the last byte relayed from the worker, or probe answered
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
        if self._breaker is Breaker.CLOSED:  # the common case, without the cooldown's clock read
            return True
        breaker = self.breaker
        return breaker is Breaker.CLOSED or (breaker is Breaker.HALF_OPEN and self._trial is None)

    # ---- probes and the supervisor ---------------------------------------------------------------------

    def probe_ok(self, since_progress: float = 0.0) -> None:
        """/health answered 200; `since_progress`: how long the engine's scheduler has had work without
        finishing a step, from its heartbeat (0 from a worker that reports none)."""
        self.last_heard = self._clock()
        if since_progress > self.settings.hang_timeout:
            self._hang(f"scheduler busy with no step for {since_progress:.1f}s")
            return
        self.probe_failures = self.probe_timeouts = 0
        self.probe_successes += 1
        if (self.state in (State.STARTING, State.UNHEALTHY) and not self.stalled
                and self.probe_successes >= self.settings.success_threshold):
            self._ready("probe")

    def probe_failed(self) -> None:
        """/health answered but not 200 (loading, draining, an engine error), or the connection failed."""
        self.probe_successes, self.probe_failures = 0, self.probe_failures + 1
        if self.state is State.STARTING:
            self._take_out("probe")
        elif self.probe_failures >= self.settings.failure_threshold:
            why = f"{self.probe_failures} failed probes"
            if self.state is State.READY:
                self._hang(why)
            else:
                self._take_out(why)  # it was out already: no new evidence of a hang

    def probe_timed_out(self) -> None:
        """No answer within the timeout: a loaded event loop, or a process that cannot answer. Out of
        routing only when the last failure_threshold probes timed out and the worker relayed no byte
        since the first of them was sent (a loaded engine still streams; one that cannot answer does not)."""
        keep = self.settings.failure_threshold - 1  # with this one, the last failure_threshold
        earlier = self.timed_out_sent[len(self.timed_out_sent) - keep:] if self.probe_timeouts and keep else []
        self.timed_out_sent = [*earlier, self._clock() - self.settings.timeout]
        self.probe_successes, self.probe_timeouts = 0, self.probe_timeouts + 1
        # Heard since the first of the last failure_threshold unanswered probes was sent?
        heard = self.last_heard >= self.timed_out_sent[0]
        log.info("gateway.probe_timed_out", worker=self.name, in_a_row=self.probe_timeouts, heard=heard)
        silent = self._clock() - self.last_heard
        if self.probe_timeouts >= self.settings.failure_threshold and silent > self.settings.hang_timeout:
            self._hang(f"{self.probe_timeouts} probes timed out and nothing heard for {silent:.1f}s")
        elif self.probe_timeouts >= self.settings.failure_threshold and not heard:
            self._take_out(f"{self.probe_timeouts} probes timed out, no byte meanwhile")

    def process_checked(self, stopped: bool) -> None:
        """The supervisor's look at a local engine's process, once per probe round. A stopped process
        (SIGSTOP) cannot serve now and will not resume by itself."""
        self.stopped_looks = self.stopped_looks + 1 if stopped else 0
        if self.stopped_looks >= self.settings.failure_threshold:
            self._hang(f"process stopped at {self.stopped_looks} looks in a row")
        elif stopped:
            self._take_out("process stopped")

    def admit(self) -> None:
        """The supervisor saw the engine answer /health and so did our probe: ready at once."""
        self.probe_failures = self.probe_timeouts = 0
        self.probe_successes += 1
        self.last_heard = self._clock()
        if self.state is not State.DEAD:
            self._ready("supervisor")

    def exited(self) -> None:
        self._set_state(State.DEAD, "process exited")

    def restarted(self) -> None:
        """A new process: nothing learned about the old one applies, its breaker included."""
        self.probe_successes = self.probe_failures = self.probe_timeouts = self.stopped_looks = 0
        self.request_failures = 0
        self.stalled = self.hung = False
        self.last_progress = self.last_heard = self._clock()
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
        self.last_progress = self.last_heard = self._clock()

    def response(self, status: int) -> None:
        """The worker answered: a 5xx counts against the breaker, anything else closes it."""
        self.last_heard = self._clock()
        if status >= 500:
            self._request_failed(f"status {status}")
        else:
            self.request_failures = 0
            if self.breaker is Breaker.HALF_OPEN:
                self._set_breaker(Breaker.CLOSED, f"trial answered {status}")

    def connect_error(self, why: str) -> None:
        """Out at once (a probe re-admits it), and one failure for the breaker."""
        self._take_out(why)
        self._request_failed(why)

    def stream_failed(self, why: str) -> None:
        self.connect_error(why)  # the connection broke mid-answer: the same evidence

    def check_stall(self, inflight: int) -> None:
        """The watchdog's look: requests in flight but no byte for stall_timeout take the worker out
        until the stall ends. Not hung by itself: long answers that are not streamed send no byte."""
        quiet = self._clock() - self.last_progress
        self.stalled = inflight > 0 and quiet > self.settings.stall_timeout
        if self.stalled:
            self._take_out(f"no bytes for {quiet:.1f}s with {inflight} in flight")

    # ---- the transitions -------------------------------------------------------------------------------

    def _take_out(self, why: str) -> None:
        self.probe_successes = 0  # re-admission counts from here
        if self.state is not State.DEAD:
            self._set_state(State.UNHEALTHY, why)

    def _hang(self, why: str) -> None:
        if self.state is State.DEAD or self.hung:
            return
        self._take_out(why)
        self.hung = True
        if self.on_hung is not None:
            self.on_hung(self.name, why)  # the supervisor kills and restarts its own hung engines

    def _ready(self, why: str) -> None:
        self.hung = False  # a later hang is a new one
        self._set_state(State.READY, why)

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
