"""One generation on the worker process, driven from the thread that asked for it.

The run loop sends the ``run`` command and then sleeps in ``poll()`` on two descriptors: the worker's event
pipe and a wake-up pipe that the request's cancel token writes to when it is cancelled. Each token therefore
goes from the pipe to the sink on this one thread: no reader thread and no queue in between. The loop has no
periodic timer: it wakes for an event, a cancel, the request's deadline, the sink's flush deadline, and, once
it has asked the runtime to stop, the abort re-send and the hang deadline.

Stopping: a cancel (abort, timeout, shutdown, a client that went away) or the 1.2 token cap sends ``abort``;
the outcome is known only when ``rkllm_run`` has returned (the RUN_RETURNED event). An abort that reaches the
runtime before ``rkllm_run`` has started is forgotten by the runtime, so it is sent again every
``ABORT_RESEND_S`` until the run returns; if it has not returned ``hang_grace_s`` after the first abort, the
worker is killed (``runtime_hung``). The timeout is enforced by cancelling the token with reason ``timeout``.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import select
import time
from dataclasses import dataclass
from typing import Any

from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.core.runtime_view import StreamSink
from rkllm_mqtt.runtime.protocol import Event, EventKind
from rkllm_mqtt.runtime.workerproc import WorkerHandle, describe_exit

ABORT_RESEND_S = 0.5
# Plain ints: compared once per token.
_CHUNK, _FINISH, _RUN_ERROR, _CAP_REACHED, _RUN_RETURNED = (
    int(EventKind.CHUNK),
    int(EventKind.FINISH),
    int(EventKind.RUN_ERROR),
    int(EventKind.CAP_REACHED),
    int(EventKind.RUN_RETURNED),
)
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


@dataclass
class RunOutcome:
    result: GenerationResult
    dirty: bool = False  # the KV cache's contents are unknown after this run
    worker_lost: str | None = None  # the worker died or was killed: the reason, for the runtime's status


class WakePipe:
    """A pipe whose read end a run loop polls; ``wake()`` (any thread, never blocks) makes it readable."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    @classmethod
    def open(cls) -> WakePipe:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        return cls(read_fd, write_fd)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed at shutdown
            os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except OSError:  # empty
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def cancel_result(cancel: CancelToken, text: str, timeout_s: float) -> GenerationResult:
    """The result of a run its token stopped: ``timeout`` for its deadline, ``abort`` for everything else."""
    if cancel.reason == "timeout":
        return GenerationResult(text, "timeout", "timeout", f"generation exceeded {timeout_s:g} s")
    messages = {
        "shutdown": "the bridge is shutting down",
        "disconnect": "the requesting client went away",
    }
    return GenerationResult(text, "abort", "aborted", messages.get(cancel.reason or "", "aborted on request"))


class RunLoop:
    """Drives one ``run`` command to its end. Used once, by the thread that called ``generate``."""

    def __init__(
        self,
        handle: WorkerHandle,
        wake: WakePipe,
        *,
        request: GenerationRequest,
        sink: StreamSink,
        cancel: CancelToken,
        command: dict[str, Any],
        hang_grace_s: float,
        default_cap: int,
    ) -> None:
        self.handle = handle
        self.wake = wake
        self.request = request
        self.sink = sink
        self.cancel = cancel
        self.command = command
        self.hang_grace_s = hang_grace_s
        self.default_cap = default_cap
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []
        self.chunks = 0
        self.started = 0.0
        self.first_at: float | None = None
        self.cap_reached = False
        self.hang_deadline: float | None = None
        self.next_abort: float | None = None
        self.finish: dict[str, Any] | None = None
        self.run_error = False
        self.returned: dict[str, Any] | None = None
        self.run_sent = False

    # -- the loop -----------------------------------------------------------------------------------

    def execute(self) -> RunOutcome:
        self.started = time.monotonic()
        if self.cancel.cancelled:  # stopped before rkllm_run could start: the worker is not even asked
            return self._outcome(cancel_result(self.cancel, "", self.request.timeout_s))
        self.wake.drain()  # wake-ups left by tokens of earlier runs
        unregister = self.cancel.on_cancel(self.wake.wake)
        try:
            return self._loop()
        except BaseException:
            # The sink (or anything else here) failed mid-run: the worker's run must still end before the next
            # one starts, or its tokens would reach the next request.
            if self.run_sent and self.returned is None:
                self._abandon()
            raise
        finally:
            unregister()

    def _loop(self) -> RunOutcome:
        deadline = self.started + self.request.timeout_s
        events = self.handle.events
        poller = select.poll()
        poller.register(events.fd, _POLL_IN)
        poller.register(self.wake.read_fd, select.POLLIN)
        if not self.handle.send("run", **self.command):
            return self._worker_gone()
        self.run_sent = True
        while self.returned is None:
            now = time.monotonic()
            if self.hang_deadline is None:
                if now >= deadline:
                    self.cancel.cancel("timeout")
                if self.cancel.cancelled:
                    self._ask_to_stop(now)
            else:
                if now >= self.hang_deadline:
                    return self._hung()
                if self.next_abort is not None and now >= self.next_abort:
                    # An abort that reached the runtime before rkllm_run had started is forgotten: repeat it.
                    self.handle.send("abort")
                    self.next_abort = now + ABORT_RESEND_S
            flush_at = self.sink.flush_deadline()
            if flush_at is not None and now >= flush_at:
                self.sink.flush()
                flush_at = self.sink.flush_deadline()
            wake_at = deadline if self.hang_deadline is None else self.hang_deadline
            if self.next_abort is not None:
                wake_at = min(wake_at, self.next_abort)
            if flush_at is not None:
                wake_at = min(wake_at, flush_at)
            timeout_ms = max(0, math.ceil((wake_at - now) * 1000.0))
            for fd, _ in poller.poll(timeout_ms):
                if fd == self.wake.read_fd:
                    self.wake.drain()
                    continue
                for event in events.read_ready():
                    self._on_event(event)
                if events.eof and self.returned is None:
                    return self._worker_gone()
        return self._returned()

    def _on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == _CHUNK:
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.chunks += 1
            text = self.decoder.decode(event.payload)
            if text:
                self.parts.append(text)
                self.sink.text(text)
        elif kind == _FINISH:
            self.finish = event.json()
        elif kind == _RUN_ERROR:
            self.run_error = True
        elif kind == _CAP_REACHED:
            self.cap_reached = True
            self._ask_to_stop(time.monotonic())
        elif kind == _RUN_RETURNED:
            self.returned = event.json()

    def _ask_to_stop(self, now: float) -> None:
        if self.hang_deadline is not None:
            return
        self.hang_deadline = now + self.hang_grace_s
        self.next_abort = now + ABORT_RESEND_S
        self.handle.send("abort")

    def _abandon(self) -> None:
        """Stop the worker's run and wait for it to return, dropping its events; kill the worker if it hangs."""
        self.handle.send("abort")
        deadline = time.monotonic() + self.hang_grace_s
        events = self.handle.events
        poller = select.poll()
        poller.register(events.fd, _POLL_IN)
        next_abort = time.monotonic() + ABORT_RESEND_S
        while not events.eof:
            now = time.monotonic()
            if now >= deadline:
                self.handle.kill("hung: rkllm_run did not return after abort")
                return
            if now >= next_abort:
                self.handle.send("abort")
                next_abort = now + ABORT_RESEND_S
            ready = poller.poll(max(0, math.ceil((min(deadline, next_abort) - now) * 1000.0)))
            if ready and any(event.kind == _RUN_RETURNED for event in events.read_ready()):
                return

    # -- endings -----------------------------------------------------------------------------------------

    def _text(self) -> str:
        tail = self.decoder.decode(b"", final=True)
        if tail:
            self.parts.append(tail)
            self.sink.text(tail)
        self.sink.flush()
        return "".join(self.parts)

    def _returned(self) -> RunOutcome:
        text = self._text()
        returned = self.returned or {}
        tokens = int((self.finish or {}).get("generate_tokens") or 0) or int(returned.get("tokens", self.chunks))
        if self.cap_reached and self.request.max_new_tokens:
            # The runtime went on past the cap until the abort reached it; that text was never forwarded.
            tokens = min(tokens, self.request.max_new_tokens)
        if self.cancel.cancelled:
            return self._outcome(cancel_result(self.cancel, text, self.request.timeout_s), tokens)
        if int(returned.get("ret", 0)) != 0 or self.run_error:
            message = returned.get("message") or "the runtime reported an error during generation"
            return self._outcome(GenerationResult(text, "error", "runtime_error", str(message)), tokens, dirty=True)
        cap = self.request.max_new_tokens or self.default_cap
        hit_cap = self.cap_reached or tokens >= cap
        return self._outcome(GenerationResult(text, "length" if hit_cap else "stop"), tokens)

    def _worker_gone(self) -> RunOutcome:
        reason = self.handle.kill_reason or describe_exit(self.handle.wait_exit(5.0))
        result = GenerationResult(
            self._text(),
            "error",
            "runtime_crashed",
            f"runtime worker {reason} during generation; the runtime is being restarted",
        )
        return self._outcome(result, self.chunks, dirty=True, worker_lost=f"runtime worker {reason}; restarting")

    def _hung(self) -> RunOutcome:
        self.handle.kill("hung: rkllm_run did not return after abort")
        result = GenerationResult(
            self._text(),
            "error",
            "runtime_hung",
            f"rkllm_run did not return within {self.hang_grace_s:g} s of an abort; the runtime was restarted",
        )
        lost = "rkllm_run hung and did not return after an abort; restarting"
        return self._outcome(result, self.chunks, dirty=True, worker_lost=lost)

    def _outcome(
        self, result: GenerationResult, tokens: int = 0, *, dirty: bool = False, worker_lost: str | None = None
    ) -> RunOutcome:
        ended = time.monotonic()
        result.completion_tokens = tokens
        if self.finish:
            result.prompt_tokens = int(self.finish.get("prefill_tokens") or 0) or None
        result.generate_ms = (ended - (self.first_at or ended)) * 1000.0
        result.ttft_ms = (self.first_at - self.started) * 1000.0 if self.first_at is not None else None
        return RunOutcome(result, dirty, worker_lost)
