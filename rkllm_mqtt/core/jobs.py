"""What a front door (MQTT, HTTP) hands the scheduler, and what it hears back.

Nothing here knows MQTT, HTTP or the worker process: a job is a generation request, a cancel token
and a reporter. The scheduler admits jobs into one bounded FIFO and runs them one at a time on the
runtime; the reporter of each job hears ``queued``/``started``/``text`` and exactly one ``finished``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from rkllm_mqtt.errors import ErrorCode
from rkllm_mqtt.payloads import FinishReason

CancelReason = Literal["abort", "timeout", "shutdown", "disconnect"]


class CancelToken:
    """Set once by whoever stops a request (an abort, its timeout, shutdown, a client that went away).

    The run loop checks it before ``rkllm_run`` starts and at every wake-up; a waker registered with
    ``on_cancel`` lets a loop blocked on a file descriptor wake up at once. The first reason wins.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: CancelReason | None = None
        self._wakers: list[Callable[[], None]] = []

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel with ``reason``; False when it was cancelled already (the first reason stands)."""
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
        return True

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> CancelReason | None:
        return self._reason

    def on_cancel(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` when cancelled (at once if it already is). Returns a function that unregisters it."""
        with self._lock:
            already = self._reason is not None
            if not already:
                self._wakers.append(wake)
        if already:
            wake()

        def unregister() -> None:
            with self._lock:
                if wake in self._wakers:
                    self._wakers.remove(wake)

        return unregister


@dataclass(frozen=True)
class GenerationRequest:
    """One run of the runtime, as any front door asks for it."""

    prompt: str
    timeout_s: float
    session: str | None = None
    system: str | None = None
    max_new_tokens: int | None = None
    sampling: dict[str, float] | None = None
    # Function-calling tool definitions (a JSON array, as rkllm_set_function_tools takes it), or None.
    tools: str | None = None
    # The runtime's thinking switch (RKLLMInput.enable_thinking).
    enable_thinking: bool = False
    # The role of this turn (RKLLMInput.role): "user", or "tool" when feeding back a tool's result.
    role: str = "user"
    # With a session: the whole conversation rendered as one user prompt, prefilled (role "user") instead of
    # ``prompt`` when the KV cache no longer holds ``session`` (another request ran in between, a restart).
    replay_prompt: str | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    error_code: ErrorCode | None = None
    error_message: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    ttft_ms: float | None = None
    generate_ms: float = 0.0


@dataclass(frozen=True)
class Job:
    """An admitted unit of work: the scheduler runs ``request`` and tells ``reporter`` how it goes."""

    id: str
    request: GenerationRequest
    reporter: JobReporter
    received_at: float
    source: str = "mqtt"  # the front door it came through, for logs and counters
    cancel: CancelToken = field(default_factory=CancelToken)


class JobReporter(Protocol):
    """How the scheduler talks back to a front door. Called on the scheduler's threads: hand work on, never block."""

    def queued(self, job: Job, position: int) -> None: ...

    def started(self, job: Job) -> None: ...

    def text(self, job: Job, chunk: str) -> None: ...

    def finished(self, job: Job, result: GenerationResult, queued_ms: float, total_ms: float) -> None:
        """Exactly once per admitted job, whatever happened to it."""
        ...


@dataclass(frozen=True)
class Admitted:
    position: int  # requests ahead of this one (the running one included)


@dataclass(frozen=True)
class Refused:
    code: ErrorCode
    message: str


Admission = Admitted | Refused
