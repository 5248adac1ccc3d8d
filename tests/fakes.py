"""Small fakes of the runtime interface, for unit tests of the scheduler and the MQTT door.

The fake runtime is driven step by step by the test (a run waits for permission before each token, unless it
runs ``free``), so every ordering is chosen by the test, never by timing. It honours the cancel token as the real
run loop does: before the run starts and at every wake-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.core.runtime_view import StreamSink
from rkllm_mqtt.errors import RequestError
from rkllm_mqtt.payloads import ModelInfo, RuntimeStatus

WAIT_S = 30.0  # a bound for waits on events that must happen; never reached unless the code under test is broken


class FakeRun:
    """One call of ``generate``: emits ``tokens`` one by one, each when the test allows it."""

    def __init__(self, request: GenerationRequest, cancel: CancelToken, tokens: list[str]) -> None:
        self.request = request
        self.cancel = cancel
        self.tokens = tokens
        self._cond = threading.Condition()
        self._allowed = 0
        self.emitted = 0
        self.decided = False
        self.unregister = cancel.on_cancel(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def finish(self) -> None:
        self.allow(len(self.tokens) + 1)

    def play(self, sink: StreamSink, before_token: Callable[[FakeRun, int], None]) -> GenerationResult:
        try:
            for index, token in enumerate(self.tokens):
                before_token(self, index)
                with self._cond:
                    ok = self._cond.wait_for(lambda i=index: self.cancel.cancelled or self._allowed > i, WAIT_S)
                    assert ok, "the test never allowed this token"
                    if self.cancel.cancelled:
                        return self._cancelled()
                sink.text(token)
                self.emitted += 1
            with self._cond:  # the finish: one last look at the token, then the outcome is decided
                if self.cancel.cancelled:
                    return self._cancelled()
                self.decided = True
            sink.flush()
            return GenerationResult(
                "".join(self.tokens), "stop", completion_tokens=len(self.tokens), ttft_ms=5.0, generate_ms=100.0
            )
        finally:
            self.unregister()

    def _cancelled(self) -> GenerationResult:
        text = "".join(self.tokens[: self.emitted])
        if self.cancel.reason == "timeout":
            return GenerationResult(text, "timeout", "timeout", "generation exceeded its time")
        return GenerationResult(text, "abort", "aborted", "aborted on request", completion_tokens=self.emitted)


class FakeRuntime:
    """Satisfies the scheduler's RuntimeRunner. Runs are gated by the test unless ``free`` is set."""

    def __init__(self, tokens: list[str] | None = None, *, free: bool = False) -> None:
        self.status: RuntimeStatus = "ready"
        self.last_error: str | None = None
        self.abi: str | None = "1.3"
        self.model_info: ModelInfo | None = None
        self.tokens = tokens or ["a", "b", "c"]
        self.free = free
        self.runs: list[FakeRun] = []
        self.forgotten: list[str | None] = []
        self.deadlines: list[float | None] = []
        self.raise_on_generate: Exception | None = None
        self.before_run: Callable[[FakeRun], None] = lambda run: None
        self.before_token: Callable[[FakeRun, int], None] = lambda run, index: None
        self._cond = threading.Condition()
        self._active = 0
        self.max_active = 0
        self.restarts = 0
        self.settled = threading.Event()
        self.settling = threading.Event()
        self.settle_waits = 0

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        if cancel.cancelled:  # checked before rkllm_run starts: nothing runs
            return FakeRun(request, cancel, [])._cancelled()
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        if self.unsupported_reason(request) is not None:
            raise RequestError("unsupported", "sampling needs runtime 1.3")
        run = FakeRun(request, cancel, list(self.tokens))
        if self.free:
            run.finish()
        with self._cond:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
            self.runs.append(run)
            self._cond.notify_all()
        try:
            self.deadlines.append(sink.flush_deadline())
            self.before_run(run)
            return run.play(sink, self.before_token)
        finally:
            with self._cond:
                self._active -= 1

    def next_run(self, count: int) -> FakeRun:
        """The ``count``-th run (1-based), once it has started."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.runs) >= count, WAIT_S)
            return self.runs[count - 1]

    def forget(self, session: str | None) -> bool:
        self.forgotten.append(session)
        return session == "held"

    def unsupported_reason(self, request: GenerationRequest) -> str | None:
        if request.sampling and self.abi == "1.2":
            return "sampling needs runtime 1.3"
        return None

    def wait_settled(self, timeout: float) -> RuntimeStatus:
        self.settle_waits += 1
        self.settling.set()
        self.settled.wait(timeout)
        return self.status

    def alive(self) -> bool:
        return True
