"""The worker process: the only process that loads the vendor runtime.

It reads its configuration as the first JSON line on stdin, loads the model once, then obeys
commands (run, abort, clear, shutdown). Runs happen on a runner thread so that the main thread
stays free to call ``rkllm_abort`` while ``rkllm_run`` blocks. The result callback only copies
the bytes into one ``os.write`` on the event pipe; everything else happens in the parent.

The runtime prints its own log lines to stdout/stderr, which are the parent's pipe: the parent reads and logs
them, and reads the runtime's version line from what rkllm_init printed (the worker marks the end of that
output with a line of its own). The worker is started by :mod:`rkllm_mqtt.runtime.workerproc`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rkllm_mqtt.errors import RkllmMqttError
from rkllm_mqtt.runtime.abi import decide_abi, resolve_library, sim_layout, sim_library_path
from rkllm_mqtt.runtime.binding import InitParams, RkllmBinding, Sampling
from rkllm_mqtt.runtime.cdefs import STATE_ERROR, STATE_FINISH, STATE_NORMAL, STATE_WAITING
from rkllm_mqtt.runtime.protocol import (
    HEADER,
    INIT_OUTPUT_END,
    EventKind,
    encode_event,
    encode_json_event,
    write_all,
)
from rkllm_mqtt.runtime.relay import Relay
from rkllm_mqtt.runtime.template import ChatTemplate, build_template

PR_SET_PDEATHSIG = 1
# The tag that marks a tool's result in a turn of role "tool" (the one Rockchip's own server demo uses).
TOOL_RESPONSE_TAG = "tool_response"


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the parent dies, so no orphan holds the NPU."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: stdin EOF still ends the worker
        pass


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _line_buffer_c_stdio() -> None:
    """C stdio to a pipe is block-buffered: the runtime's log lines would reach the parent late or
    never (a crash loses the buffer). Line-buffer both streams."""
    try:
        libc = ctypes.CDLL(None)
        for name in ("stdout", "stderr"):
            stream = ctypes.c_void_p.in_dll(libc, name)
            libc.setvbuf(stream, None, 1, 0)  # 1 = _IOLBF
    except (OSError, ValueError, AttributeError):
        pass


_CHUNK_HEADER = HEADER.pack
_CHUNK = int(EventKind.CHUNK)


class Worker:
    def __init__(self, event_fd: int, config: dict[str, Any]) -> None:
        self.event_fd = event_fd
        self.config = config
        self.binding: Any = None
        self.relay: Relay | None = None  # token frames written in C (None: through on_result)
        self.template: ChatTemplate | None = None
        # (system prompt, tools JSON) last given to rkllm_set_function_tools; None while function calling is off.
        self.function_tools: tuple[str, str] | None = None
        self.runs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        # Set by an abort that arrives after the run command: the runner then skips rkllm_run (which would
        # forget an abort that came before it started). Reset by every run command.
        self.abort_pending = False
        # Per-run counters touched only by the callback (one run at a time).
        self.tokens = 0
        self.cap = 0
        self.cap_sent = False

    # -- events -------------------------------------------------------------------------------

    def emit(self, kind: EventKind, payload: bytes = b"") -> None:
        write_all(self.event_fd, encode_event(kind, payload))

    def emit_json(self, kind: EventKind, data: dict[str, Any]) -> None:
        write_all(self.event_fd, encode_json_event(kind, data))

    def on_result(self, state: int, text: bytes | None, perf: Any) -> None:
        """Runs on the runtime's thread: hand the bytes on, nothing else."""
        if state in (STATE_NORMAL, STATE_WAITING):
            if text:
                if self.cap and self.tokens >= self.cap:
                    if not self.cap_sent:
                        self.cap_sent = True
                        self.emit(EventKind.CAP_REACHED)
                    return
                if state == STATE_NORMAL:
                    self.tokens += 1
                frame = _CHUNK_HEADER(_CHUNK, len(text)) + text
                written = os.write(self.event_fd, frame)  # one write: a frame below PIPE_BUF goes whole
                if written < len(frame):
                    write_all(self.event_fd, frame[written:])
        elif state == STATE_FINISH:
            stats = (
                {
                    "prefill_time_ms": perf.prefill_time_ms,
                    "prefill_tokens": perf.prefill_tokens,
                    "generate_time_ms": perf.generate_time_ms,
                    "generate_tokens": perf.generate_tokens,
                    "memory_usage_mb": perf.memory_usage_mb,
                }
                if perf is not None
                else {}
            )
            self.emit_json(EventKind.FINISH, stats)
        elif state == STATE_ERROR:
            self.emit(EventKind.RUN_ERROR)

    # -- start-up -------------------------------------------------------------------------------

    def load(self) -> bool:
        cfg = self.config
        stage = "library"
        try:
            library = str(cfg["library"])
            path = sim_library_path(sim_layout(str(cfg["abi"]))) if library == "sim" else resolve_library(library)
            stage = "abi"
            decision = decide_abi(path, str(cfg["abi"]))
            stage = "model"
            model_path = str(cfg["model_path"])
            if not model_path.startswith("sim:"):
                model_file = Path(model_path)
                if not model_file.is_file():
                    raise RkllmMqttError(f"model file {model_path} does not exist or is not a file")
                if not os.access(model_file, os.R_OK):
                    raise RkllmMqttError(f"model file {model_path} is not readable by this user")
            stage = "library"
            binding = RkllmBinding(str(path), decision.abi)
            binding.open()
            stage = "init"
            started = time.monotonic()
            init = dict(cfg["init"])
            init["model_path"] = model_path
            self.relay = Relay.load(self.event_fd)
            if self.relay is None:
                print("rkllm-mqtt worker: the C token relay is not built; tokens go through Python", flush=True)
            binding.init(InitParams(**init), self.on_result, relay=self.relay)
            load_ms = (time.monotonic() - started) * 1000.0
            # Everything rkllm_init printed is in the pipe before this line (the parent checks its version).
            _flush_c_stdio()
            sys.stdout.write(INIT_OUTPUT_END + "\n")
            sys.stdout.flush()
            self.binding = binding
            stage = "lora"
            for adapter in cfg.get("lora_adapters", []):
                binding.load_lora(adapter["path"], adapter["name"], float(adapter["scale"]))
            stage = "prompt_cache"
            cache = cfg.get("prompt_cache_path")
            if cache and Path(cache).is_file():
                binding.load_prompt_cache(cache)
            stage = "chat_template"
            self.apply_template(str(cfg.get("system_prompt") or ""))
        except Exception as exc:  # every failure is reported to the parent, which explains it
            self.emit_json(EventKind.INIT_FAILED, {"stage": stage, "message": str(exc)})
            return False
        self.emit_json(
            EventKind.READY,
            {
                "library": str(path),
                "abi": decision.abi,
                "abi_reason": decision.reason,
                "runtime_version": decision.version,
                "load_time_ms": load_ms,
                "loaded_at": time.time(),
            },
        )
        return True

    def apply_tools(self, system: str, tools: str | None) -> None:
        """Function calling on (tools given), changed, or off again before the run."""
        if tools:
            if self.function_tools != (system, tools):
                self.binding.set_function_tools(system, tools, TOOL_RESPONSE_TAG)
                self.function_tools = (system, tools)
            return
        leaving = self.function_tools is not None
        self.function_tools = None
        self.apply_template(system, force=leaving)

    def apply_template(self, system: str, *, force: bool = False) -> None:
        """Set the chat template for ``system`` when it changed; ``force`` sets it in any case (after function
        calling, which replaced it inside the runtime)."""
        markup = self.config["library"] != "sim"
        prefix, postfix = self.config.get("prompt_prefix"), self.config.get("prompt_postfix")
        template = build_template(system, prefix, postfix, markup=markup)
        if force:
            self.template = None
            if template is None:  # the markup only, as build_template writes it for a system prompt
                shaped = build_template(" ", prefix, postfix, markup=markup)
                template = ChatTemplate("", shaped.prompt_prefix, shaped.prompt_postfix) if shaped else None
        if template is None and self.template is not None:
            # Once a template was set the model's own one cannot be restored: keep the markup, drop the system.
            template = ChatTemplate("", self.template.prompt_prefix, self.template.prompt_postfix)
        if template is not None and template != self.template:
            self.binding.set_chat_template(template.system_prompt, template.prompt_prefix, template.prompt_postfix)
            self.template = template

    # -- commands ---------------------------------------------------------------------------------

    def run_one(self, cmd: dict[str, Any]) -> None:
        ret, message = 0, ""
        try:
            self.apply_tools(str(cmd.get("system") or ""), cmd.get("tools"))
            if cmd.get("clear_first"):
                self.binding.clear_kv_cache(False)
            self.tokens = 0
            self.cap = int(cmd.get("enforce_cap") or 0)
            self.cap_sent = False
            if self.relay is not None:
                self.relay.begin_run(self.cap)
            if self.abort_pending:  # aborted before it started: rkllm_run would forget that abort
                self.emit_json(EventKind.RUN_RETURNED, {"ret": 0, "message": "", "tokens": 0})
                return
            sampling = cmd.get("sampling")
            self.binding.run(
                str(cmd["prompt"]),
                keep_history=bool(cmd.get("keep_history")),
                role=str(cmd.get("role") or "user"),
                enable_thinking=bool(cmd.get("enable_thinking")),
                max_new_tokens=cmd.get("max_new_tokens"),
                sampling=Sampling(**sampling) if sampling else None,
                lora_name=cmd.get("lora_name"),
            )
        except RkllmMqttError as exc:
            ret, message = getattr(exc, "ret", -1), exc.message
        except Exception as exc:  # reported, never fatal: the parent decides what to do
            ret, message = -1, f"{type(exc).__name__}: {exc}"
        tokens = self.relay.tokens() if self.relay is not None else self.tokens
        self.emit_json(EventKind.RUN_RETURNED, {"ret": ret, "message": message, "tokens": tokens})

    def runner(self) -> None:
        while True:
            cmd = self.runs.get()
            if cmd is None:
                return
            self.run_one(cmd)

    def serve(self, commands: Any) -> None:
        runner = threading.Thread(target=self.runner, name="rkllm-run", daemon=True)
        runner.start()
        for line in commands:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "run":
                self.abort_pending = False
                self.runs.put(cmd)
            elif op == "abort":
                self.abort_pending = True
                self.binding.abort()
            elif op == "shutdown":
                break
        # stdin closed or shutdown asked: release the NPU cleanly when no run is stuck.
        self.runs.put(None)
        runner.join(timeout=5.0)
        if not runner.is_alive():
            self.binding.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rkllm-mqtt runtime worker (started by the daemon)")
    parser.add_argument("--event-fd", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    _line_buffer_c_stdio()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the worker stops
    config = json.loads(sys.stdin.readline())
    worker = Worker(args.event_fd, config)
    if not worker.load():
        return 3
    worker.serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
