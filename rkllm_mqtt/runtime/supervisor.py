"""The runtime supervisor: owns the worker process from the parent's side.

It starts the worker and waits for the model to load, restarts it with backoff when it dies or fails to
start, runs one generation at a time (``generate`` blocks the calling thread, streams decoded text to a sink
and stops when the request's cancel token says so) and keeps track of what the runtime's single KV cache
holds, so that no request sees another conversation's history. How a run is driven is in
:mod:`rkllm_mqtt.runtime.runloop`; the worker's side of it in docs/runtime.md.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.core.runtime_view import StreamSink
from rkllm_mqtt.errors import RequestError
from rkllm_mqtt.payloads import ModelInfo, RuntimeStatus
from rkllm_mqtt.runtime.abi import check_init_version, version_in_log_line
from rkllm_mqtt.runtime.cdefs import per_request_refusal
from rkllm_mqtt.runtime.kvcache import KvCache
from rkllm_mqtt.runtime.protocol import INIT_OUTPUT_END, Event, EventKind, EventReader
from rkllm_mqtt.runtime.runloop import RunLoop, WakePipe, cancel_result
from rkllm_mqtt.runtime.workerproc import WorkerHandle, describe_exit, worker_command, worker_environment
from rkllm_mqtt.settings import Settings

__all__ = ["RuntimeSupervisor", "StreamSink", "describe_exit", "is_error_line"]

log = structlog.get_logger(__name__)

LOAD_TIMEOUT_S = 600.0
# How long the end of rkllm_init's output may trail the READY event (two pipes, read by two threads).
INIT_LOG_GRACE_S = 30.0
SIM_DEFAULT_MODEL = "sim:"


def is_error_line(line: str) -> bool:
    """A runtime log line that reports an error: the vendor's ``E rkllm: ...`` form, or any line saying error."""
    return line.startswith(("E ", "E:")) or " E " in line[:12] or "error" in line.lower()


class RuntimeSupervisor:
    """The worker process's life and the one generation at a time on it. Thread-safe."""

    def __init__(self, settings: Settings, on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_change = on_change or (lambda: None)
        self._status_changed = threading.Condition()  # guards _status and _last_error; notified on change
        self._run_lock = threading.Lock()
        self._stopping = threading.Event()
        self._manager: threading.Thread | None = None
        self._handle: WorkerHandle | None = None
        self._wake: WakePipe | None = None
        self._status: RuntimeStatus = "loading"
        self._last_error: str | None = None
        self._model_info: ModelInfo | None = None
        self._restarts = 0
        self._refused_as_is = False  # the last start was refused for a reason a plain retry cannot change
        self._kv = KvCache()

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

    @property
    def worker_pid(self) -> int | None:
        """The pid of the current worker process (for diagnostics and measurements)."""
        handle = self._handle
        return handle.proc.pid if handle is not None and not handle.dead.is_set() else None

    def alive(self) -> bool:
        """The supervising thread is running (it restarts the worker whatever happens to it)."""
        return self._manager is not None and self._manager.is_alive()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the runtime is ready (True) or has failed / the time is up (False)."""
        deadline = time.monotonic() + timeout
        with self._status_changed:
            while self._status != "ready":
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    return False
                self._status_changed.wait(remaining)
            return True

    def wait_settled(self, timeout: float) -> RuntimeStatus:
        """Wait until the runtime is ready or failed; returns the status then."""
        deadline = time.monotonic() + timeout
        with self._status_changed:
            while self._status not in ("ready", "failed"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    break
                self._status_changed.wait(remaining)
            return self._status

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = WakePipe.open()
        self._manager = threading.Thread(target=self._manage, name="runtime-supervisor", daemon=True)
        self._manager.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._status_changed:
            self._status_changed.notify_all()
        handle = self._handle
        if handle is not None:
            handle.send("shutdown")
            if handle.wait_exit(timeout) is None:
                handle.kill("stopping")
                handle.wait_exit(5)
        if self._manager is not None:
            self._manager.join(timeout)
        # The wake-up pipe goes only when no run can be using it.
        if self._wake is not None and self._run_lock.acquire(timeout=timeout):
            try:
                self._wake.close()
                self._wake = None
            finally:
                self._run_lock.release()

    def _set_status(self, status: RuntimeStatus, error: str | None = None) -> None:
        with self._status_changed:
            self._status = status
            if error is not None:
                self._last_error = error
            self._status_changed.notify_all()
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
            if handle is not None:
                ready = self._await_startup(handle)
                returncode = handle.proc.wait()
                with self._run_lock:  # a run on this worker has seen its end too
                    handle.dead.set()
                    os.close(handle.events.fd)
                if ready and not self._stopping.is_set():
                    backoff = self.settings.runtime.restart_backoff_s
                    reason = handle.kill_reason or describe_exit(returncode)
                    log.error("runtime_worker_died", reason=reason, restarts=self._restarts + 1)
                    self._set_status("restarting", f"runtime worker {reason}; restarting")
            if self._refused_as_is:
                self._refused_as_is = False
                backoff = self.settings.runtime.restart_backoff_max_s
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

    def _spawn(self) -> WorkerHandle | None:
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                worker_command(write_fd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=worker_environment(os.environ),
                start_new_session=True,  # a Ctrl-C in the terminal reaches the daemon only
            )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            self._set_status("failed", f"cannot start the runtime worker: {exc}")
            return None
        os.close(write_fd)
        handle = WorkerHandle(proc=proc, events=EventReader(read_fd))
        self._handle = handle
        threading.Thread(target=self._read_logs, args=(handle,), name="runtime-log", daemon=True).start()
        log.info("runtime_worker_started", pid=proc.pid, library=self.settings.runtime.resolved_library())
        if proc.stdin is not None:
            try:
                proc.stdin.write((json.dumps(self._worker_config()) + "\n").encode("utf-8"))
                proc.stdin.flush()
            except OSError:
                pass  # the worker died at once; start-up sees the end of its event pipe
        return handle

    def _startup_event(self, handle: WorkerHandle) -> Event | None:
        """The worker's first event (READY or INIT_FAILED), read on this thread; None if the worker ended
        first. Raises TimeoutError when loading takes longer than LOAD_TIMEOUT_S."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        events: list[Event] = []
        while not events and not handle.events.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([handle.events.fd], [], [], remaining)
            if readable:
                events = handle.events.read_ready()
        # The worker writes nothing after its start-up event until it is asked to run.
        return events[0] if events else None

    def _await_startup(self, handle: WorkerHandle) -> bool:
        """Wait for the worker to load the model; True once the runtime is ready. On a failure the worker is
        ended (or ends by itself) and the status says why."""
        try:
            event = self._startup_event(handle)
        except TimeoutError:
            handle.kill("did not finish loading the model in time")
            self._set_status("failed", f"runtime did not load the model within {LOAD_TIMEOUT_S:.0f} s")
            return False
        if event is None or event.kind != EventKind.READY:
            message = self._startup_failure(handle, event)
            log.error("runtime_failed", error=message)
            self._set_status("failed", message)
            handle.kill("failed to start")
            return False
        info = event.json()
        refusal = self._check_said_version(handle, str(info["abi"]))
        if refusal is not None:
            handle.send("shutdown")  # before any rkllm_run
            if handle.wait_exit(10) is None:
                handle.kill("refused: wrong ABI layout")
            # The same library and settings will say the same again: retry only at the longest backoff, in case
            # the library is replaced, and say that a restart alone will not help.
            self._refused_as_is = True
            longest = self.settings.runtime.restart_backoff_max_s
            refusal += f"; retrying will not help until runtime.abi or the library changes (next try in {longest:g} s)"
            log.error("runtime_failed", error=refusal)
            self._set_status("failed", refusal)
            return False
        rt = self.settings.runtime
        self._model_info = ModelInfo(
            model_path=self.model_path,
            model_name=self.model_name,
            abi=info["abi"],
            abi_reason=info.get("abi_reason", ""),
            runtime_version=info.get("runtime_version") or handle.said_version,
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
        self._kv.reset()
        log.info(
            "runtime_ready",
            model=self.model_name,
            abi=info["abi"],
            abi_reason=info.get("abi_reason"),
            load_ms=self._model_info.load_time_ms,
        )
        self._set_status("ready")
        return True

    def _check_said_version(self, handle: WorkerHandle, abi: str) -> str | None:
        """Whether what the runtime printed during rkllm_init contradicts the layout in use (docs/runtime.md)."""
        if not handle.init_logged.wait(INIT_LOG_GRACE_S):
            log.warning("runtime_init_output_missing", waited_s=INIT_LOG_GRACE_S)
            return None
        said = handle.said_version
        if said is None:
            log.info("runtime_version_not_logged", abi=abi)
            return None
        return check_init_version(said, abi, self.settings.runtime.abi)

    def _startup_failure(self, handle: WorkerHandle, event: Event | None) -> str:
        # Let the worker exit and its last log lines arrive: they often hold the real cause.
        handle.wait_exit(5)
        handle.log_done.wait(2)
        said = [line for line in handle.log_tail if is_error_line(line)]
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

    def _read_logs(self, handle: WorkerHandle) -> None:
        stream = handle.proc.stdout
        if stream is None:
            return
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line:
                continue
            if line == INIT_OUTPUT_END:
                handle.init_logged.set()
                continue
            if not handle.init_logged.is_set() and handle.said_version is None:
                handle.said_version = version_in_log_line(line)
            handle.log_tail.append(line)
            if is_error_line(line):
                log.warning("runtime_log", line=line)
            else:
                log.info("runtime_log", line=line)
        handle.log_done.set()

    # -- sessions --------------------------------------------------------------------------------------

    def forget(self, session: str | None) -> bool:
        """Forget a conversation (None: whatever is held). The cache is cleared before the next run.

        Returns True when the cache held that conversation.
        """
        return self._kv.forget(session)

    # -- generation -------------------------------------------------------------------------------------

    def unsupported_reason(self, request: GenerationRequest) -> str | None:
        """Why the runtime cannot run ``request`` as asked (code ``unsupported``), or None.

        Before the model is loaded the layout is known only when ``runtime.abi`` names it; ``generate`` asks
        again once it is.
        """
        abi = self.abi or (self.settings.runtime.abi if self.settings.runtime.abi != "auto" else None)
        if abi is None:
            return None
        return per_request_refusal(abi, sampling=list(request.sampling or ()))

    def system_prompt(self, request: GenerationRequest) -> str | None:
        """The system prompt a request runs with: its own, or the configured one."""
        return request.system if request.system is not None else self.settings.runtime.system_prompt

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        """Run ``request`` to its end, streaming text to ``sink``; blocks the calling thread.

        ``cancel`` stops it: checked before the run starts and at every wake-up of the run loop. Its reason
        decides the result: ``timeout`` gives finish_reason ``timeout``, every other reason ``abort`` (code
        ``aborted``). The request's ``timeout_s`` is enforced by cancelling the token with reason ``timeout``.
        Raises RequestError (``not_ready``, ``unsupported``) when the request cannot be run at all.
        """
        if cancel.cancelled:  # stopped before it could start, whatever the runtime's state
            return cancel_result(cancel, "", request.timeout_s)
        with self._run_lock:
            handle, wake = self._handle, self._wake
            if self._status != "ready" or handle is None or wake is None or handle.dead.is_set():
                raise RequestError("not_ready", self._not_ready_message())
            refusal = self.unsupported_reason(request)
            if refusal is not None:
                raise RequestError("unsupported", refusal)
            system = self.system_prompt(request)
            command = self._run_command(request, system)
            if request.replay_prompt is not None and not self._kv.holds(request.session, system, request.tools):
                # The cache does not hold this conversation (any more): prefill all of it.
                command["prompt"], command["role"] = request.replay_prompt, "user"
            command["clear_first"] = self._kv.begin(request.session, system, request.tools)
            dirty = True
            try:
                outcome = RunLoop(
                    handle,
                    wake,
                    request=request,
                    sink=sink,
                    cancel=cancel,
                    command=command,
                    hang_grace_s=self.settings.limits.hang_grace_s,
                    default_cap=self.settings.runtime.max_new_tokens,
                ).execute()
                dirty = outcome.dirty
            finally:
                self._kv.end(request.session, system, dirty=dirty, tools=request.tools)
            if outcome.worker_lost is not None:
                self._set_status("restarting", outcome.worker_lost)
                if outcome.result.error_code == "runtime_hung":
                    log.error("runtime_hung", grace_s=self.settings.limits.hang_grace_s)
            return outcome.result

    def _run_command(self, request: GenerationRequest, system: str | None) -> dict[str, Any]:
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
        if self.abi == "1.2":
            command["enforce_cap"] = cap  # 1.2 has no per-run cap: the worker stops generation itself
        else:
            command["max_new_tokens"] = cap or None
            command["sampling"] = request.sampling or None
        return command

    def _not_ready_message(self) -> str:
        if self._status == "failed":
            return f"runtime failed to start: {self._last_error}"
        return f"runtime is {self._status}"
