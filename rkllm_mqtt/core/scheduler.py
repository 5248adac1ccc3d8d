"""One NPU, one queue: admission, a bounded FIFO and single flight, for every front door.

A front door (MQTT, HTTP) builds a :class:`~rkllm_mqtt.core.jobs.Job` and calls :meth:`Scheduler.submit`,
which never blocks. The scheduler's runner thread takes admitted jobs one at a time and drives the runtime
(anything that satisfies :class:`RuntimeRunner`). What happens to a job is told to its own reporter
(``queued``, ``started``, ``text``, then exactly one ``finished``); what happens to the scheduler as a whole
(queue depth, the running job, counters) is told to observers through ``on_change()`` and read with
:meth:`Scheduler.snapshot`. Nothing here knows MQTT, HTTP or Home Assistant.

The public surface, which every front door uses unchanged:

- ``submit(job) -> Admitted | Refused``: admission. ``job.reporter.queued(job, position)`` has been called
  when it returns ``Admitted``; nothing is reported for a ``Refused`` job (the front door answers it).
- ``abort(job_id | None) -> AbortOutcome``: cancel a queued or the running job (``None``: the running one).
- ``clear(session | None) -> bool``: forget a conversation held by the runtime.
- ``record_rejection(code)``: count a request a front door refused before submitting it.
- ``snapshot() -> SchedulerSnapshot``: what the state topic (or an HTTP status page) shows.
- ``observe(observer)``: be told (``on_change()``) whenever the snapshot may have changed.
- ``start()`` / ``shutdown(grace_s)`` / ``healthy(now)``: lifecycle, for the daemon.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import structlog

from rkllm_mqtt.core.jobs import (
    Admission,
    Admitted,
    CancelToken,
    GenerationRequest,
    GenerationResult,
    Job,
    Refused,
)
from rkllm_mqtt.core.runtime_view import RuntimeStatusView, StreamSink
from rkllm_mqtt.errors import ErrorCode, RequestError
from rkllm_mqtt.payloads import FinishReason, RuntimeStatus

log = structlog.get_logger(__name__)

# Refusals that are the client's mistake: counted in ``rejected_total``, never in ``errors_total``, and never
# shown as the bridge's own problem (``last_error``).
CLIENT_MISTAKES: frozenset[ErrorCode] = frozenset(
    {"invalid_json", "invalid_request", "invalid_utf8", "prompt_too_long", "forbidden_topic"}
)
# Failures of the runtime itself: the last one is kept as ``last_error``.
RUNTIME_FAILURES: frozenset[ErrorCode] = frozenset({"runtime_error", "runtime_crashed", "runtime_hung"})
# Ends of a job that are nobody's error.
_NOT_ERRORS: frozenset[ErrorCode] = frozenset({"aborted", "timeout"})
# A run is bounded by its timeout plus the runtime's hang grace; past that, and this margin, the runner is wedged.
_WEDGED_MARGIN_S = 60.0
# While the runtime loads, a started job waits for it in slices this long, so an abort is seen between them.
_SETTLE_SLICE_S = 0.5

AbortOutcome = Literal["running", "queued", "not_found", "idle"]


class RuntimeRunner(RuntimeStatusView, Protocol):
    """The runtime as the scheduler drives it (the worker supervisor in the daemon, a fake in tests)."""

    @property
    def abi(self) -> str | None: ...

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        """Run one request. Returns when it is over; ``cancel`` stops it (abort, timeout, shutdown, disconnect),
        also when it is cancelled already: then nothing runs and the result says why.

        Raises :class:`~rkllm_mqtt.errors.RequestError` when it cannot run at all (``not_ready``, ``unsupported``).
        """
        ...

    def forget(self, session: str | None) -> bool: ...

    def unsupported_reason(self, request: GenerationRequest) -> str | None:
        """Why the loaded runtime cannot honour ``request`` (e.g. sampling on the 1.2 layout), or None."""
        ...

    def wait_settled(self, timeout: float) -> RuntimeStatus: ...


class SchedulerObserver(Protocol):
    def on_change(self) -> None:
        """The snapshot may have changed. Called on the scheduler's or a front door's thread: never block."""
        ...


@runtime_checkable
class BufferingReporter(Protocol):
    """A reporter that coalesces text: the runtime wakes up at ``flush_deadline`` to call ``flush``.

    Optional: a reporter without these methods gets every piece of text as it comes."""

    def flush_deadline(self, job: Job) -> float | None: ...

    def flush(self, job: Job) -> None: ...


@dataclass(frozen=True)
class SchedulerSnapshot:
    current_id: str | None
    current_source: str | None
    queue_depth: int
    requests_total: int
    errors_total: int
    rejected_total: int
    tokens_per_s: float | None
    ttft_ms: float | None
    last_error: str | None
    stopping: bool

    @property
    def busy(self) -> bool:
        """A job runs or waits: a new one would not start at once."""
        return self.current_id is not None or self.queue_depth > 0


def tokens_per_s(result: GenerationResult) -> float | None:
    """Generation speed of a run, from its first token to its end."""
    if result.completion_tokens and result.generate_ms > 0:
        return round(result.completion_tokens / (result.generate_ms / 1000.0), 2)
    return None


def unrun(code: ErrorCode, message: str) -> GenerationResult:
    """The result of a job that ended without reaching the runtime."""
    reason: FinishReason = "abort" if code == "aborted" else "timeout" if code == "timeout" else "error"
    return GenerationResult("", reason, code, message)


class _ReporterSink:
    """The stream sink for one job: the runtime's text goes straight to the job's reporter."""

    __slots__ = ("_buffering", "_failed", "_job", "_text")

    def __init__(self, job: Job) -> None:
        self._job = job
        self._text = job.reporter.text
        reporter = job.reporter
        self._buffering = reporter if isinstance(reporter, BufferingReporter) else None
        self._failed = False

    def text(self, chunk: str) -> None:
        try:
            self._text(self._job, chunk)
        except Exception:  # a broken front door must not break the run: the job still gets its final
            if not self._failed:
                self._failed = True
                log.exception("reporter_failed", request_id=self._job.id, call="text")

    def flush_deadline(self) -> float | None:
        return self._buffering.flush_deadline(self._job) if self._buffering is not None else None

    def flush(self) -> None:
        if self._buffering is not None:
            self._buffering.flush(self._job)


class Scheduler:
    """Admits jobs into one bounded FIFO and runs them one at a time on the runtime."""

    def __init__(
        self,
        runtime: RuntimeRunner,
        *,
        queue_size: int,
        hang_grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.queue_size = queue_size
        self.hang_grace_s = hang_grace_s
        self.clock = clock
        self._lock = threading.Condition()  # one mutex: the queue, the current job and the counters
        self._queue: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._current_started: float | None = None
        self._stopping = False
        self._runner: threading.Thread | None = None
        self._observers: list[SchedulerObserver] = []
        self._requests_total = 0
        self._errors_total = 0
        self._rejected_total = 0
        self._tokens_per_s: float | None = None
        self._ttft_ms: float | None = None
        self._last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def observe(self, observer: SchedulerObserver) -> None:
        """Tell ``observer`` about every change from now on. Call before ``start``."""
        self._observers.append(observer)

    def start(self) -> None:
        self._runner = threading.Thread(target=self._run_loop, name="scheduler-runner", daemon=True)
        self._runner.start()

    def shutdown(self, grace_s: float) -> None:
        """Admit nothing more, finish queued jobs ``aborted``, give the running one ``grace_s`` to end, then
        cancel it (reason ``shutdown``) and wait for the runner to stop."""
        with self._lock:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._lock.notify_all()
        for job in pending:
            job.cancel.cancel("shutdown")
            self._finish(job, unrun("aborted", "the bridge is shutting down"), started=self.clock())
        self._changed()
        runner = self._runner
        if runner is None:
            return
        runner.join(grace_s)
        if runner.is_alive():
            with self._lock:
                current = self._current
            if current is not None:
                log.info("shutdown_cancelling_running", request_id=current.id)
                current.cancel.cancel("shutdown")
            runner.join(self.hang_grace_s + 5.0)

    # -- the front doors' calls --------------------------------------------------------------------------

    def submit(self, job: Job) -> Admission:
        """Admit ``job`` or say why not. Never blocks on the runtime; a refused job is the caller's to answer."""
        position = 0
        with self._lock:
            self._requests_total += 1
            refusal = self._refusal(job)
            if refusal is not None:
                if refusal.code in CLIENT_MISTAKES:
                    self._rejected_total += 1
                else:
                    self._errors_total += 1
            else:
                position = len(self._queue) + (1 if self._current is not None else 0)
                # Reported before the runner can see the job, so ``queued`` always precedes ``started``.
                self._report(job, "queued", lambda: job.reporter.queued(job, position))
                self._queue.append(job)
                self._lock.notify_all()
        if refusal is not None:
            log.info("request_refused", request_id=job.id, source=job.source, code=refusal.code)
            self._changed()
            return refusal
        log.info("request_queued", request_id=job.id, source=job.source, position=position)
        self._changed()
        return Admitted(position)

    def _refusal(self, job: Job) -> Refused | None:
        """Why ``job`` cannot be admitted now, or None. Called with the lock held."""
        if self._stopping:
            return Refused("not_ready", "the bridge is shutting down")
        if self.runtime.status == "failed":
            return Refused("not_ready", f"runtime failed to start: {self.runtime.last_error}")
        unsupported = self.runtime.unsupported_reason(job.request)
        if unsupported is not None:
            return Refused("unsupported", unsupported)
        if (self._current is not None and self._current.id == job.id) or any(q.id == job.id for q in self._queue):
            return Refused("invalid_request", f"id {job.id} is already in use by a pending request")
        # The jobs this one would wait behind, the running one included; it waits only when that is not zero.
        ahead = len(self._queue) + (1 if self._current is not None else 0)
        if ahead > self.queue_size:
            return Refused(
                "queue_full", f"{len(self._queue)} requests are waiting (limits.queue_size = {self.queue_size})"
            )
        return None

    def record_rejection(self, code: ErrorCode) -> None:
        """Count a request a front door refused before it reached ``submit`` (malformed, forbidden topic, ...)."""
        with self._lock:
            self._requests_total += 1
            if code in CLIENT_MISTAKES:
                self._rejected_total += 1
            else:
                self._errors_total += 1
        self._changed()

    def abort(self, job_id: str | None = None) -> AbortOutcome:
        """Cancel the job ``job_id`` (None: the running one). A queued job is finished ``aborted`` at once; the
        running one ends ``aborted`` as soon as the runtime sees its token."""
        removed: Job | None = None
        with self._lock:
            current = self._current
            if current is not None and (job_id is None or current.id == job_id):
                target: Job | None = current
            else:
                target = None
                removed = next((job for job in self._queue if job.id == job_id), None)
                if removed is not None:
                    self._queue.remove(removed)
        if target is not None:
            log.info("abort_requested", request_id=target.id, running=True)
            target.cancel.cancel("abort")
            return "running"
        if removed is not None:
            log.info("abort_requested", request_id=removed.id, running=False)
            removed.cancel.cancel("abort")
            self._finish(removed, unrun("aborted", "aborted while queued"), started=self.clock())
            self._changed()
            return "queued"
        return "idle" if job_id is None else "not_found"

    def clear(self, session: str | None) -> bool:
        """Forget the conversation ``session`` (None: whatever the runtime holds). True when it was held."""
        held = self.runtime.forget(session)
        log.info("history_cleared", session=session or "(all)", held=held)
        return held

    # -- state ------------------------------------------------------------------------------------------------

    def snapshot(self) -> SchedulerSnapshot:
        with self._lock:
            current = self._current
            return SchedulerSnapshot(
                current_id=current.id if current else None,
                current_source=current.source if current else None,
                queue_depth=len(self._queue),
                requests_total=self._requests_total,
                errors_total=self._errors_total,
                rejected_total=self._rejected_total,
                tokens_per_s=self._tokens_per_s,
                ttft_ms=self._ttft_ms,
                last_error=self._last_error,
                stopping=self._stopping,
            )

    def healthy(self, now: float | None = None) -> bool:
        """For a watchdog: the runner lives and no run has outlasted its bound. No side effects."""
        now = self.clock() if now is None else now
        runner = self._runner
        if runner is None or not runner.is_alive():
            return False
        with self._lock:
            current, started = self._current, self._current_started
        if current is None or started is None:
            return True
        return now - started < current.request.timeout_s + self.hang_grace_s + _WEDGED_MARGIN_S

    # -- the runner thread ---------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._current = job
                self._current_started = started = self.clock()
            result: GenerationResult | None = None
            try:
                result = self._run(job)
            except Exception:  # whatever fails, the job still gets its one final
                log.exception("request_failed", request_id=job.id)
            finally:
                if result is None:
                    result = unrun("runtime_error", "internal error while running the request")
                self._finish(job, result, started)
                with self._lock:
                    self._current = None
                    self._current_started = None
                self._changed()

    def _run(self, job: Job) -> GenerationResult:
        self._report(job, "started", lambda: job.reporter.started(job))
        self._changed()
        log.info("request_started", request_id=job.id, source=job.source)
        request, cancel = job.request, job.cancel
        if self.runtime.status in ("loading", "restarting"):
            deadline = self.clock() + request.timeout_s
            while not cancel.cancelled and self.runtime.status in ("loading", "restarting"):
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self.runtime.wait_settled(min(_SETTLE_SLICE_S, remaining))
            with self._lock:  # the wait had its own bound; the watchdog's bound on the run starts now
                self._current_started = self.clock()
        # A token cancelled by now, or a runtime changed since admission, is the runtime's to answer.
        try:
            return self.runtime.generate(request, _ReporterSink(job), cancel)
        except RequestError as exc:
            return unrun(exc.code, exc.message)

    def _finish(self, job: Job, result: GenerationResult, started: float) -> None:
        ended = self.clock()
        code = result.error_code
        with self._lock:
            if code is None:
                self._tokens_per_s = tokens_per_s(result)
                self._ttft_ms = round(result.ttft_ms, 2) if result.ttft_ms is not None else None
            elif code in CLIENT_MISTAKES:
                self._rejected_total += 1
            elif code not in _NOT_ERRORS:
                self._errors_total += 1
                if code in RUNTIME_FAILURES:
                    self._last_error = result.error_message or code
        queued_ms = round((started - job.received_at) * 1000.0, 2)
        total_ms = round((ended - job.received_at) * 1000.0, 2)
        log.info(
            "request_done",
            request_id=job.id,
            source=job.source,
            finish_reason=result.finish_reason,
            code=code,
            tokens=result.completion_tokens,
            ttft_ms=result.ttft_ms,
            total_ms=total_ms,
        )
        self._report(job, "finished", lambda: job.reporter.finished(job, result, queued_ms, total_ms))

    # -- helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _report(job: Job, what: str, call: Callable[[], None]) -> None:
        """Call a reporter; its failure is logged, never allowed to stop the scheduler."""
        try:
            call()
        except Exception:
            log.exception("reporter_failed", request_id=job.id, call=what)

    def _changed(self) -> None:
        for observer in self._observers:
            try:
                observer.on_change()
            except Exception:
                log.exception("observer_failed")
