"""What the fault campaign's scripts share: a restartable Mosquitto with persistence, a daemon whose simulated
model can be changed between worker starts, a recording client, and the book-keeping of who was answered.

Everything is black-box: the scripts speak MQTT to a daemon they started, and read /proc for its memory and
file descriptors. Nothing here imports the daemon's code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if not __package__:  # pragma: no cover - the scripts add the repo root themselves
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.procs import LOOPBACK, Daemon, Mosquitto, _wait_port
from bench.sysinfo import alive, memory, mosquitto_binary

ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def stop_on_sigterm() -> None:
    """SIGTERM ends a script like Ctrl-C: its ``with`` blocks stop the daemon and broker it started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def say(text: str) -> None:
    print(text, flush=True)


# -- processes ------------------------------------------------------------------------------------------


class PersistentMosquitto(Mosquitto):
    """The bench's Mosquitto with persistence, restartable on the same port (its queued messages survive a
    SIGTERM restart, as with a production broker)."""

    def __init__(self, workdir: Path, *, max_queued: int = 0) -> None:
        super().__init__(workdir)
        self.max_queued = max_queued

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "log_dest none",
            f"max_queued_messages {self.max_queued}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def restart(self, down_s: float = 1.0) -> None:
        """SIGTERM (Mosquitto saves its state), stay down ``down_s``, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        binary = mosquitto_binary()
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        _wait_port(self.port, self.proc, 10.0)


class FaultDaemon(Daemon):
    """A daemon whose simulated model is a file: its first line (a ``sim:`` spec) is read at every worker start,
    so writing the next spec and killing the worker switches the fault the runtime will show."""

    def __init__(
        self, workdir: Path, port: int, *, spec: str, limits: dict[str, Any], runtime: dict[str, Any] | None = None
    ) -> None:
        self.model_file = workdir / f"model-{uuid.uuid4().hex[:6]}.rkllm"
        self.model_file.write_text(f"sim:{spec}\n")
        super().__init__(workdir, port, model=str(self.model_file), limits=limits, runtime=runtime, label="fault")

    def set_spec(self, spec: str) -> None:
        tmp = self.model_file.with_suffix(".tmp")
        tmp.write_text(f"sim:{spec}\n")
        tmp.replace(self.model_file)

    def kill_worker(self) -> bool:
        """SIGKILL the runtime worker (what the OOM killer does); False when none is alive."""
        pids = [pid for pid in self.worker_pids() if alive(pid)]
        if not pids:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[-1], signal.SIGKILL)
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the daemon itself (a power cut, as far as the broker can tell)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.exit_code = self.proc.returncode
            self.proc = None


def rss_kb(pid: int) -> int:
    return memory(pid).get("VmRSS", 0)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the recording client -----------------------------------------------------------------------------------


@dataclass
class Book:
    """What the daemon said about each request id, as seen on its response topics."""

    finals: dict[str, list[bytes]] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)
    error_ids: set[str] = field(default_factory=set)
    errors_anonymous: int = 0
    final_states: dict[str, int] = field(default_factory=dict)
    retained_copies: int = 0

    def answered(self, rid: str) -> bool:
        return rid in self.finals

    def twice(self) -> list[str]:
        """Ids with two different finals. The same bytes twice is MQTT's at-least-once, not a second answer."""
        return [rid for rid, payloads in self.finals.items() if len(set(payloads)) > 1]

    def redelivered(self) -> int:
        return sum(len(payloads) - len(set(payloads)) for payloads in self.finals.values())


class Recorder:
    """A persistent-session MQTT 5 client that books finals, ``queued`` statuses and error events of one node,
    and resubscribes by itself after a broker restart."""

    def __init__(self, port: int, root: str, name: str = "faults") -> None:
        self.port = port
        self.root = root
        self.book = Book()
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self._subacks = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(0.2, 2)
        self.last_event = time.monotonic()

    def start(self) -> Recorder:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect(LOOPBACK, self.port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("the campaign's client could not connect")
        with self.cond:
            if not self.cond.wait_for(lambda: self._subacks >= 1, 10):
                raise RuntimeError("no SUBACK")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            return
        self.connected.set()
        client.subscribe(
            [(f"{self.root}/response/+", 1), (f"{self.root}/response/+/status", 1), (f"{self.root}/error", 1)]
        )

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_subscribe(self, *args: Any) -> None:
        with self.cond:
            self._subacks += 1
            self.cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        payload = bytes(message.payload)
        with self.cond:
            self.last_event = time.monotonic()
            book = self.book
            if topic == f"{self.root}/error":
                data = _json(payload)
                rid = data.get("id") if isinstance(data, dict) else None
                if isinstance(rid, str):
                    book.error_ids.add(rid)
                else:
                    book.errors_anonymous += 1
            elif topic.endswith("/status"):
                data = _json(payload)
                if isinstance(data, dict) and data.get("status") == "queued" and isinstance(data.get("id"), str):
                    book.queued.add(data["id"])
            else:
                rid = topic.rsplit("/", 1)[1]
                if message.retain and rid in book.finals:
                    # The retained copy of a final already received, sent again because the recorder subscribed
                    # again (after a broker restart): the broker's doing, not a second delivery by the daemon.
                    book.retained_copies += 1
                    return
                book.finals.setdefault(rid, []).append(payload)
                data = _json(payload)
                if isinstance(data, dict):
                    state = str(data.get("state"))
                    code = (data.get("error") or {}).get("code") if isinstance(data.get("error"), dict) else None
                    key = code or state
                    book.final_states[key] = book.final_states.get(key, 0) + 1
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos)

    def wait_answered(self, ids: set[str], stall_s: float, cap_s: float) -> bool:
        """Wait until every id has a final, giving up after ``stall_s`` without any message or ``cap_s`` in all."""
        deadline = time.monotonic() + cap_s
        with self.cond:
            while True:
                if all(rid in self.book.finals for rid in ids):
                    return True
                now = time.monotonic()
                if now >= deadline or now - self.last_event >= stall_s:
                    return False
                self.cond.wait(0.5)

    def wait_final(self, rid: str, timeout: float) -> bytes | None:
        with self.cond:
            self.cond.wait_for(lambda: rid in self.book.finals, timeout)
            found = self.book.finals.get(rid)
            return found[0] if found else None


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def daemon_id_of(payload: bytes) -> str | None:
    """The id the daemon will use for a prompt payload, when the payload names one the daemon accepts."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.lstrip().startswith("{"):
        return None
    data = _json(payload)
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        return None  # a request is one flat object (docs/topics.md): the daemon need not read ids in anything else
    rid = data.get("id")
    if isinstance(rid, str) and 1 <= len(rid) <= 64 and set(rid) <= ID_CHARS:
        return rid
    return None


def wait_ready(rec: Recorder, daemon: Daemon, timeout: float = 60.0) -> None:
    """Until the daemon's retained health says the runtime is ready (a throw-away subscriber)."""
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ready-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        data = _json(bytes(m.payload))
        if isinstance(data, dict) and data.get("runtime") == "ready":
            ready.set()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(f"{daemon.root}/health", 1)
    client.connect(LOOPBACK, rec.port, 30)
    client.loop_start()
    try:
        if not ready.wait(timeout):
            raise RuntimeError(f"the daemon did not become ready:\n{daemon.log_tail()}")
    finally:
        client.disconnect()
        client.loop_stop()


class Verdict:
    """Invariants checked at the end of a script: each failed one is printed and makes the exit status 1."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, text: str) -> None:
        say(f"  [{'ok' if ok else 'FAIL'}] {text}")
        if not ok:
            self.failed.append(text)

    def exit_code(self) -> int:
        return 1 if self.failed else 0


class Workdir:
    """A temporary directory kept when asked to (``--keep``), for the daemon's log."""

    def __init__(self, keep: bool) -> None:
        import tempfile

        self.keep = keep
        self.path = Path(tempfile.mkdtemp(prefix="rkllm-faults-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.keep or exc is not None:
            say(f"work directory kept: {self.path}")
            return
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
