"""The processes the bench starts: a Mosquitto broker and ``rkllm-mqtt serve``, both on loopback only.

Each is a context manager that stops what it started (SIGTERM, then SIGKILL after a bounded wait), also when
the bench fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.sysinfo import alive, mosquitto_binary

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g} s")


def _terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class Mosquitto:
    """A private Mosquitto on a free loopback port: no persistence, no logging, queues without a cap."""

    def __init__(self, workdir: Path, tcp_nodelay: bool = False) -> None:
        self.workdir = workdir
        self.tcp_nodelay = tcp_nodelay
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            "persistence false",
            "log_dest none",
            # The bench's subscriber must see every chunk of a 100,000-token reply: no queue limit.
            "max_queued_messages 0",
        ]
        if self.tcp_nodelay:
            # Off by default in Mosquitto, as on most installations: Nagle's algorithm on the broker's sockets.
            lines.append("set_tcp_nodelay true")
        if os.geteuid() == 0:
            lines.append("user root")  # as root Mosquitto would switch to its own user, which cannot read workdir
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Mosquitto:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        try:
            _wait_port(self.port, self.proc, 10.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 10.0)
            self.proc = None


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document of flat sections. JSON's string, number and boolean literals are valid TOML."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


class Daemon:
    """``python -m rkllm_mqtt serve`` with its own config, node id and JSON log file, on the simulated runtime."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        model: str,
        limits: dict[str, Any] | None = None,
        runtime: dict[str, Any] | None = None,
        label: str = "daemon",
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.node = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        self.model = model
        self.limits = limits or {}
        self.runtime = runtime or {}
        self.config_path = workdir / f"{self.node}.toml"
        self.log_path = workdir / f"{self.node}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_ns = 0
        self.exit_code: int | None = None

    @property
    def root(self) -> str:
        return f"rkllm/{self.node}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config(self) -> dict[str, dict[str, Any]]:
        return {
            "mqtt": {"host": LOOPBACK, "port": self.port, "node_id": self.node, "protocol": "5"},
            "runtime": {"library": "sim", "model_path": self.model, **self.runtime},
            "limits": dict(self.limits),
            "homeassistant": {"enabled": False},
            "daemon": {"state_dir": str(self.workdir / "state")},
            "logging": {"format": "json", "level": "info"},
        }

    def __enter__(self) -> Daemon:
        self.config_path.write_text(toml_text(self.config()))
        # Only this config counts: no RKLLM_MQTT_* override from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
        # The daemon must import this checkout's package even when it runs from the work directory.
        repo = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        with self.log_path.open("wb") as log:
            self.spawned_ns = time.monotonic_ns()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rkllm_mqtt", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,  # a crashing worker's core file, if any, lands in the work directory
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> int | None:
        """SIGTERM (the daemon's clean shutdown), SIGKILL after 30 s; then make sure no worker is left."""
        if self.proc is None:
            return None
        workers = self.worker_pids()
        code = _terminate(self.proc, 30.0)
        self.exit_code = code
        self.proc = None
        for pid in workers:
            # The worker dies with its parent (PDEATHSIG); this only catches a straggler of this daemon.
            deadline = time.monotonic() + 5.0
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code

    def logs(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return events
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def worker_pids(self) -> list[int]:
        """Every worker this daemon started (from its log), oldest first."""
        return [int(e["pid"]) for e in self.logs() if e.get("event") == "runtime_worker_started" and "pid" in e]

    def worker_pid(self, timeout: float = 10.0) -> int:
        """The current worker's pid (the latest one started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [pid for pid in self.worker_pids() if alive(pid)]
            if pids:
                return pids[-1]
            time.sleep(0.05)
        raise RuntimeError(f"no live runtime worker of {self.node} after {timeout:g} s")

    def problems(self) -> list[str]:
        """Warnings and errors the daemon logged (expected ones, such as queue_full rejections, included)."""
        return [
            f"{e.get('level')}: {e.get('event')} {e.get('code') or e.get('reason') or e.get('error') or ''}".strip()
            for e in self.logs()
            if e.get("level") in ("warning", "error", "critical")
        ]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
