"""The runtime supervisor: owns the worker process from the parent's side.

It starts the worker and waits for the model to load, restarts it with backoff when it dies or
fails to start, runs one generation at a time (``generate`` blocks the calling thread and streams
decoded text to a sink), enforces the request's timeout (abort first, kill after ``hang_grace_s``)
and keeps track of what the runtime's single KV cache holds, so that no request sees another
conversation's history.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from rkllm_mqtt.core.jobs import GenerationRequest
from rkllm_mqtt.errors import ErrorCode, RequestError
from rkllm_mqtt.payloads import FinishReason, ModelInfo, RuntimeStatus
from rkllm_mqtt.runtime.protocol import Event, EventKind, EventReader, encode_command
from rkllm_mqtt.settings import Settings

log = structlog.get_logger(__name__)

LOAD_TIMEOUT_S = 600.0
ABORT_RESEND_S = 0.5
SIM_DEFAULT_MODEL = "sim:"
_LOG_TAIL = 30


class StreamSink(Protocol):
    """Receives decoded text as it arrives; may buffer it until ``flush_deadline``."""

    def text(self, chunk: str) -> None: ...

    def flush_deadline(self) -> float | None: ...

    def flush(self) -> None: ...


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
    perf: dict[str, Any] | None = None


class _Dirty:
    """Marks a KV cache whose contents are unknown (after an error): clear before the next run."""


DIRTY = _Dirty()
KvOwner = str | None | _Dirty


@dataclass
class _WorkerHandle:
    proc: subprocess.Popen[bytes]
    event_fd: int
    started: threading.Event = field(default_factory=threading.Event)
    dead: threading.Event = field(default_factory=threading.Event)
    startup: Event | None = None
    runs: queue.Queue[Event | str | None] = field(default_factory=queue.Queue)
    log_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_LOG_TAIL))
    log_done: threading.Event = field(default_factory=threading.Event)
    kill_reason: str | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, op: str, **fields: Any) -> bool:
        stdin = self.proc.stdin
        if stdin is None:
            return False
        try:
            with self.send_lock:
                stdin.write(encode_command(op, **fields))
                stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class RuntimeSupervisor:
    def __init__(self, settings: Settings, on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_change = on_change or (lambda: None)
        self._state_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._ready_cond = threading.Condition(self._state_lock)
        self._stopping = threading.Event()
        self._manager: threading.Thread | None = None
        self._handle: _WorkerHandle | None = None
        self._status: RuntimeStatus = "loading"
        self._last_error: str | None = None
        self._model_info: ModelInfo | None = None
        self._restarts = 0
        self._kv_owner: KvOwner = None
        self._kv_system: str | None = None
        self._kv_tools: str | None = None
        self._forget_pending = False
        self._running = False

    # -- public state -----------------------------------------------------------------------------

    @property
    def status(self) -> RuntimeStatus:
        return self._status

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def model_info(self) -> ModelInfo | None:
        return self._model_info

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def abi(self) -> str | None:
        return self._model_info.abi if self._model_info else None

    def alive(self) -> bool:
        """The supervising thread is running (it restarts the worker whatever happens to it)."""
        return self._manager is not None and self._manager.is_alive()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the runtime is ready (True) or has failed / the time is up (False)."""
        deadline = time.monotonic() + timeout
        with self._ready_cond:
            while self._status != "ready":
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    return False
                self._ready_cond.wait(remaining)
            return True

    def wait_settled(self, timeout: float) -> RuntimeStatus:
        """Wait until the runtime is ready or failed; returns the status then."""
        deadline = time.monotonic() + timeout
        with self._ready_cond:
            while self._status not in ("ready", "failed"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    break
                self._ready_cond.wait(remaining)
            return self._status

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._manager = threading.Thread(target=self._manage, name="runtime-supervisor", daemon=True)
        self._manager.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._ready_cond:
            self._ready_cond.notify_all()
        handle = self._handle
        if handle is not None:
            handle.send("shutdown")
            try:
                handle.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                handle.kill("stopping")
                handle.proc.wait(5)
        if self._manager is not None:
            self._manager.join(timeout)

    def _set_status(self, status: RuntimeStatus, error: str | None = None) -> None:
        with self._ready_cond:
            self._status = status
            if error is not None:
                self._last_error = error
            self._ready_cond.notify_all()
        self.on_change()

    def _manage(self) -> None:
        """Start the worker, wait for it, restart it with backoff; until ``stop()``."""
        backoff = self.settings.runtime.restart_backoff_s
        attempts = 0
        while not self._stopping.is_set():
            if attempts:
                self._restarts += 1
            attempts += 1
            # After a failed start the status stays "failed" during retries: requests get not_ready.
            if self._status != "failed":
                self._set_status("loading" if attempts == 1 else "restarting")
            handle = self._spawn()
            if handle is not None and self._await_startup(handle):
                backoff = self.settings.runtime.restart_backoff_s
                handle.dead.wait()
                if self._stopping.is_set():
                    break
                reason = handle.kill_reason or describe_exit(handle.proc.wait())
                log.error("runtime_worker_died", reason=reason, restarts=self._restarts + 1)
                self._set_status("restarting", f"runtime worker {reason}; restarting")
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, self.settings.runtime.restart_backoff_max_s)

    def _worker_config(self) -> dict[str, Any]:
        rt = self.settings.runtime
        init = {
            "max_context_len": rt.max_context_len,
            "max_new_tokens": rt.max_new_tokens,
            "top_k": rt.top_k,
            "top_p": rt.top_p,
            "temperature": rt.temperature,
            "repeat_penalty": rt.repeat_penalty,
            "frequency_penalty": rt.frequency_penalty,
            "presence_penalty": rt.presence_penalty,
            "skip_special_token": rt.skip_special_token,
            "enabled_cpus_mask": rt.enabled_cpus_mask,
            "embed_flash": rt.embed_flash,
        }
        return {
            "library": rt.resolved_library(),
            "abi": rt.abi,
            "model_path": self.model_path,
            "init": init,
            "system_prompt": rt.system_prompt,
            "prompt_prefix": rt.prompt_prefix,
            "prompt_postfix": rt.prompt_postfix,
            "lora_adapters": [a.model_dump() for a in rt.lora_adapters],
            "prompt_cache_path": rt.prompt_cache_path,
        }

    @property
    def model_path(self) -> str:
        return self.settings.runtime.model_path or SIM_DEFAULT_MODEL

    @property
    def model_name(self) -> str:
        rt = self.settings.runtime
        if rt.model_name:
            return rt.model_name
        if rt.model_path is None or rt.model_path.startswith("sim:"):
            return "simulated"
        return Path(rt.model_path).stem

    def _spawn(self) -> _WorkerHandle | None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the daemon talks to systemd
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rkllm_mqtt.runtime.worker", "--event-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the daemon only
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            self._set_status("failed", f"cannot start the runtime worker: {exc}")
            return None
        os.close(write_fd)
        handle = _WorkerHandle(proc=proc, event_fd=read_fd)
        self._handle = handle
        threading.Thread(target=self._read_events, args=(handle,), name="runtime-events", daemon=True).start()
        threading.Thread(target=self._read_logs, args=(handle,), name="runtime-log", daemon=True).start()
        log.info("runtime_worker_started", pid=proc.pid, library=self.settings.runtime.resolved_library())
        if proc.stdin is not None:
            try:
                proc.stdin.write((json.dumps(self._worker_config()) + "\n").encode("utf-8"))
                proc.stdin.flush()
            except OSError:
                pass  # the worker died at once; the event reader reports it
        return handle

    def _await_startup(self, handle: _WorkerHandle) -> bool:
        if not handle.started.wait(LOAD_TIMEOUT_S):
            handle.kill("did not finish loading the model in time")
            self._set_status("failed", f"runtime did not load the model within {LOAD_TIMEOUT_S:.0f} s")
            return False
        event = handle.startup
        if event is not None and event.kind == EventKind.READY:
            info = event.json()
            rt = self.settings.runtime
            self._model_info = ModelInfo(
                model_path=self.model_path,
                model_name=self.model_name,
                abi=info["abi"],
                abi_reason=info.get("abi_reason", ""),
                runtime_version=info.get("runtime_version"),
                library=info["library"],
                max_context_len=rt.max_context_len,
                max_new_tokens=rt.max_new_tokens,
                top_k=rt.top_k,
                top_p=rt.top_p,
                temperature=rt.temperature,
                repeat_penalty=rt.repeat_penalty,
                frequency_penalty=rt.frequency_penalty,
                presence_penalty=rt.presence_penalty,
                load_time_ms=round(float(info["load_time_ms"]), 1),
                loaded_at=float(info["loaded_at"]),
                lora_adapters=[a.name for a in rt.lora_adapters],
            )
            with self._state_lock:
                self._kv_owner = None
                self._kv_system = None
            log.info(
                "runtime_ready",
                model=self.model_name,
                abi=info["abi"],
                abi_reason=info.get("abi_reason"),
                load_ms=self._model_info.load_time_ms,
            )
            self._set_status("ready")
            return True
        message = self._startup_failure(handle, event)
        log.error("runtime_failed", error=message)
        self._set_status("failed", message)
        return False

    def _startup_failure(self, handle: _WorkerHandle, event: Event | None) -> str:
        # Let the worker exit and its last log lines arrive: they often hold the real cause.
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.proc.wait(5)
        handle.log_done.wait(2)
        said = [line for line in handle.log_tail if line.startswith(("E ", "E:")) or " E " in line[:12]]
        if event is None:
            detail = f"runtime worker {describe_exit(handle.proc.poll())} while loading"
            if handle.log_tail:
                detail += f"; last output: {handle.log_tail[-1]}"
            return detail
        data = event.json()
        stage, message = data.get("stage", "init"), data.get("message", "")
        library = self.settings.runtime.resolved_library()
        if stage == "library":
            text = f"runtime library '{library}': {message}"
        elif stage == "init":
            text = f"rkllm_init failed for model {self.model_path}: {message}"
        else:
            text = message
        if said and said[-1] not in text:
            text += f" (runtime said: {said[-1]})"
        return text

    # -- worker output ------------------------------------------------------------------------------

    def _read_events(self, handle: _WorkerHandle) -> None:
        reader = EventReader(handle.event_fd)
        try:
            while True:
                event = reader.read()
                if event is None:
                    break
                if event.kind in (EventKind.READY, EventKind.INIT_FAILED):
                    handle.startup = event
                    handle.started.set()
                else:
                    handle.runs.put(event)
        finally:
            os.close(handle.event_fd)
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.proc.wait(10)
            handle.dead.set()
            handle.started.set()
            handle.runs.put(None)

    def _read_logs(self, handle: _WorkerHandle) -> None:
        stream = handle.proc.stdout
        if stream is None:
            return
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line:
                continue
            handle.log_tail.append(line)
            if line.startswith("E ") or "error" in line.lower():
                log.warning("runtime_log", line=line)
            else:
                log.info("runtime_log", line=line)
        handle.log_done.set()

    # -- sessions --------------------------------------------------------------------------------------

    def forget(self, session: str | None) -> bool:
        """Forget a conversation (None: whatever is held). The cache is cleared before the next run.

        Returns True when the cache held that conversation.
        """
        with self._state_lock:
            if self._kv_owner is None or (session is not None and self._kv_owner != session):
                return False
            if self._running:
                self._forget_pending = True
            else:
                self._kv_owner = DIRTY
            return True

    # -- generation -------------------------------------------------------------------------------------

    def abort(self) -> None:
        """Abort the running generation, if any. Returns at once; ``generate`` reports the outcome."""
        handle = self._handle
        if handle is not None and self._running:
            handle.runs.put("abort")

    def generate(self, request: GenerationRequest, sink: StreamSink) -> GenerationResult:
        with self._run_lock:
            handle = self._handle
            if self._status != "ready" or handle is None or handle.dead.is_set():
                raise RequestError("not_ready", self._not_ready_message())
            abi = self._model_info.abi if self._model_info else "1.3"
            if abi == "1.2" and request.sampling:
                raise RequestError(
                    "unsupported",
                    "per-request sampling settings need runtime 1.3; the loaded runtime uses the 1.2 layout",
                )
            system = request.system if request.system is not None else self.settings.runtime.system_prompt
            cap = request.max_new_tokens or 0
            adapters = self.settings.runtime.lora_adapters
            command: dict[str, Any] = {
                "prompt": request.prompt,
                "system": system,
                "keep_history": request.session is not None,
                "lora_name": adapters[0].name if adapters else None,
                "role": request.role,
                "enable_thinking": request.enable_thinking,
                "tools": request.tools,
            }
            if abi == "1.2":
                command["enforce_cap"] = cap  # 1.2 has no per-run cap: the worker stops generation itself
            else:
                command["max_new_tokens"] = cap or None
                command["sampling"] = request.sampling or None
            with self._state_lock:
                owner = self._kv_owner
                # The cache holds this conversation: same session, same system prompt and tools.
                held = (
                    request.session is not None
                    and owner == request.session
                    and self._kv_system == system
                    and self._kv_tools == request.tools
                )
                # Nothing to clear after a run that kept no history; else whatever is not this conversation.
                clear_first = owner is not None and not held
                if not held and request.session is not None and request.replay_prompt is not None:
                    # The cache does not hold this conversation (any more): prefill all of it.
                    command["prompt"], command["role"] = request.replay_prompt, "user"
                command["clear_first"] = clear_first
                self._running = True
                self._forget_pending = False
            try:
                return self._drive(handle, command, request, sink)
            finally:
                with self._state_lock:
                    self._running = False

    def _not_ready_message(self) -> str:
        if self._status == "failed":
            return f"runtime failed to start: {self._last_error}"
        return f"runtime is {self._status}"

    def _drive(
        self, handle: _WorkerHandle, command: dict[str, Any], request: GenerationRequest, sink: StreamSink
    ) -> GenerationResult:
        while not handle.runs.empty():  # nothing from an earlier run may leak into this one
            handle.runs.get_nowait()
        started = time.monotonic()
        if not handle.send("run", **command):
            return self._after_run(request, GenerationResult("", "error", "runtime_crashed", "runtime worker is gone"))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        deadline = started + request.timeout_s
        stop_reason: Literal["abort", "timeout", "length"] | None = None
        hang_deadline: float | None = None
        first_at: float | None = None
        perf: dict[str, Any] | None = None
        run_error = False
        returned: dict[str, Any] | None = None
        chunks = 0

        next_abort: float | None = None

        def request_stop(reason: Literal["abort", "timeout", "length"]) -> None:
            nonlocal stop_reason, hang_deadline, next_abort
            if stop_reason is None:
                stop_reason = reason
            if hang_deadline is None:
                hang_deadline = time.monotonic() + self.settings.limits.hang_grace_s
                next_abort = time.monotonic() + ABORT_RESEND_S
                handle.send("abort")

        while True:
            now = time.monotonic()
            wake = hang_deadline if hang_deadline is not None else deadline
            flush_at = sink.flush_deadline()
            if flush_at is not None:
                wake = min(wake, flush_at)
            if next_abort is not None:
                wake = min(wake, next_abort)
            try:
                item = handle.runs.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                now = time.monotonic()
                if flush_at is not None and now >= flush_at:
                    sink.flush()
                if next_abort is not None and now >= next_abort:
                    # An abort that reaches the runtime before rkllm_run has started is forgotten: repeat it.
                    next_abort = now + ABORT_RESEND_S
                    handle.send("abort")
                if hang_deadline is not None and now >= hang_deadline:
                    handle.kill("hung: rkllm_run did not return after abort")
                    self._set_status("restarting", "rkllm_run hung and did not return after an abort; restarting")
                    log.error("runtime_hung", grace_s=self.settings.limits.hang_grace_s)
                    result = GenerationResult(
                        "".join(parts),
                        "error",
                        "runtime_hung",
                        f"rkllm_run did not return within {self.settings.limits.hang_grace_s:g} s of an abort;"
                        " the runtime was restarted",
                    )
                    return self._after_run(
                        request, result, started=started, first_at=first_at, tokens=chunks, dirty=True
                    )
                if hang_deadline is None and now >= deadline:
                    request_stop("timeout")
                continue
            if item is None:
                reason = handle.kill_reason or describe_exit(handle.proc.poll())
                self._set_status("restarting", f"runtime worker {reason}; restarting")
                result = GenerationResult(
                    "".join(parts) + decoder.decode(b"", final=True),
                    "error",
                    "runtime_crashed",
                    f"runtime worker {reason} during generation; the runtime is being restarted",
                )
                return self._after_run(request, result, started=started, first_at=first_at, tokens=chunks, dirty=True)
            if item == "abort":
                request_stop("abort")
                continue
            assert isinstance(item, Event)
            if item.kind == EventKind.CHUNK:
                if first_at is None:
                    first_at = time.monotonic()
                chunks += 1
                text = decoder.decode(item.payload)
                if text:
                    parts.append(text)
                    sink.text(text)
            elif item.kind == EventKind.FINISH:
                perf = item.json()
            elif item.kind == EventKind.RUN_ERROR:
                run_error = True
            elif item.kind == EventKind.CAP_REACHED:
                request_stop("length")
            elif item.kind == EventKind.RUN_RETURNED:
                returned = item.json()
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            sink.text(tail)
        sink.flush()
        text = "".join(parts)
        tokens = int(perf.get("generate_tokens") or 0) if perf else 0
        tokens = tokens or int(returned.get("tokens", chunks))
        if stop_reason == "length" and request.max_new_tokens:
            # The runtime went on past the cap until the abort reached it; that text was never forwarded.
            tokens = min(tokens, request.max_new_tokens)
        ret = int(returned.get("ret", 0))
        if stop_reason == "timeout":
            result = GenerationResult(text, "timeout", "timeout", f"generation exceeded {request.timeout_s:g} s")
        elif stop_reason == "abort":
            result = GenerationResult(text, "abort", "aborted", "aborted on request")
        elif ret != 0 or run_error:
            message = returned.get("message") or "the runtime reported an error during generation"
            return self._after_run(
                request,
                GenerationResult(text, "error", "runtime_error", str(message)),
                started=started,
                first_at=first_at,
                tokens=tokens,
                perf=perf,
                dirty=True,
            )
        else:
            cap = request.max_new_tokens or self.settings.runtime.max_new_tokens
            hit_cap = stop_reason == "length" or tokens >= cap
            result = GenerationResult(text, "length" if hit_cap else "stop")
        return self._after_run(request, result, started=started, first_at=first_at, tokens=tokens, perf=perf)

    def _after_run(
        self,
        request: GenerationRequest,
        result: GenerationResult,
        *,
        started: float | None = None,
        first_at: float | None = None,
        tokens: int = 0,
        perf: dict[str, Any] | None = None,
        dirty: bool = False,
    ) -> GenerationResult:
        ended = time.monotonic()
        result.completion_tokens = tokens
        result.perf = perf
        if perf:
            result.prompt_tokens = int(perf.get("prefill_tokens") or 0) or None
        if started is not None:
            result.generate_ms = (ended - (first_at or ended)) * 1000.0
            result.ttft_ms = (first_at - started) * 1000.0 if first_at is not None else None
        system = request.system if request.system is not None else self.settings.runtime.system_prompt
        with self._state_lock:
            if dirty or self._forget_pending:
                self._kv_owner = DIRTY
            else:
                self._kv_owner = request.session
            self._kv_system = system
            self._kv_tools = request.tools
            self._forget_pending = False
        return result
