"""Real processes for end-to-end tests: the daemon, a Mosquitto broker, and an MQTT probe client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .helpers import free_port, unique_topic


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class Mosquitto:
    """A Mosquitto broker on a free loopback port, with persistence so it can be restarted."""

    def __init__(self, workdir: Path, port: int | None = None, *, users: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.users = users
        self.proc: subprocess.Popen[bytes] | None = None

    def _auth_lines(self) -> str:
        if not self.users:
            return "allow_anonymous true\n"
        password_file = self.workdir / "mosquitto.passwd"
        password_file.write_text("")
        for user, password in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True, timeout=10)
        password_file.chmod(0o600)
        return f"allow_anonymous false\npassword_file {password_file}\n"

    def start(self) -> None:
        binary = mosquitto_binary()
        assert binary is not None, "mosquitto is not installed"
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n" + self._auth_lines() + "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "log_dest none\n" + ("user root\n" if os.geteuid() == 0 else "")
            # As root, Mosquitto drops to its own user, which cannot write the test's private directory.
        )
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # TERM makes Mosquitto save its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


class Probe:
    """A test MQTT client that records everything it receives on its subscriptions."""

    def __init__(
        self,
        port: int,
        *,
        v5: bool = False,
        client_id: str | None = None,
        persistent: bool = False,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.auth = auth
        self.port = port
        self.v5 = v5
        self.client_id = client_id or unique_topic("probe")
        self.persistent = persistent
        self.messages: list[Received] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.subacks = 0
        self.client: mqtt.Client | None = None

    def start(self) -> Probe:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not self.persistent,
        )
        if self.auth is not None:
            client.username_pw_set(*self.auth)
        client.on_message = self._on_message
        client.on_connect = lambda *args: self.connected.set()
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(0.1, 0.5)
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = 600
            client.connect("127.0.0.1", self.port, 30, clean_start=not self.persistent, properties=props)
        else:
            client.connect("127.0.0.1", self.port, 30)
        client.loop_start()
        self.client = client
        assert self.connected.wait(10), "probe could not connect"
        return self

    def _on_subscribe(self, *args: Any) -> None:
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self.cond:
            self.messages.append(
                Received(message.topic, bytes(message.payload), bool(message.retain), corr, time.monotonic())
            )
            self.cond.notify_all()

    def subscribe(self, *topics: str) -> None:
        assert self.client is not None
        with self.cond:
            target = self.subacks + len(topics)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: self.subacks >= target, 20), "no SUBACK"

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> None:
        assert self.client is not None
        data = payload.encode() if isinstance(payload, str) else payload
        properties = None
        if response_topic is not None or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        self.client.publish(topic, data, qos=1, retain=retain, properties=properties).wait_for_publish(10)

    def on(self, topic: str) -> list[Received]:
        with self.cond:
            return [m for m in self.messages if m.topic == topic]

    def on_prefix(self, prefix: str) -> list[Received]:
        with self.cond:
            return [m for m in self.messages if m.topic.startswith(prefix)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.messages), timeout):
                recent = [(m.topic, m.payload[:200]) for m in self.messages[-15:]]
                raise AssertionError(f"timed out waiting for messages; the last ones were {recent}")
            return list(self.messages)

    def wait_topic(self, topic: str, count: int = 1, timeout: float = 20.0) -> list[Received]:
        self.wait_for(lambda msgs: sum(1 for m in msgs if m.topic == topic) >= count, timeout)
        return self.on(topic)

    def wait_json(self, topic: str, predicate: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        def match(msgs: list[Received]) -> bool:
            return any(m.topic == topic and m.payload and predicate(m.json()) for m in msgs)

        self.wait_for(match, timeout)
        return next(m.json() for m in self.on(topic) if m.payload and predicate(m.json()))

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


class Daemon:
    """``rkllm-mqtt serve`` as a real process with a config file written for the test."""

    def __init__(self, workdir: Path, port: int, *, node: str | None = None, **sections: dict[str, Any]) -> None:
        self.workdir = workdir
        self.port = port
        self.node = node or unique_topic("node")
        self.sections = sections
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = workdir / f"{self.node}.log"

    @property
    def root(self) -> str:
        base = self.sections.get("mqtt", {}).get("base_topic", "rkllm")
        return f"{base}/{self.node}"

    def config_text(self) -> str:
        sections: dict[str, dict[str, Any]] = {
            # amqtt (the default test broker) speaks 3.1.1 only; tests of "auto" and MQTT 5 set protocol.
            "mqtt": {"host": "127.0.0.1", "port": self.port, "node_id": self.node, "protocol": "3.1.1"},
            "runtime": {"model_path": "sim:rate=0,prefill_ms=0,tokens=12", "library": "sim", "restart_backoff_s": 0.2},
            "logging": {"format": "json", "level": "info"},
            # Discovery adds 16 retained configs per daemon to the shared test broker; the tests of it turn it on.
            "homeassistant": {"enabled": False},
            # The record of answered request ids stays in the test's directory (and survives a restart in it).
            "daemon": {"state_dir": str(self.workdir / "state")},
        }
        for name, values in self.sections.items():
            sections.setdefault(name, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def start(self, extra_env: dict[str, str] | None = None) -> Daemon:
        config = self.workdir / f"{self.node}.toml"
        config.write_text(self.config_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
        env.update(extra_env or {})
        log = self.log_path.open("a")  # a restarted daemon goes on in the same log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rkllm_mqtt", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        return self

    def logs(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.proc = None
        return code


def wait_ready(probe: Probe, daemon: Daemon, timeout: float = 30.0) -> None:
    """Wait until the daemon is online and its runtime is ready (retained health)."""
    probe.subscribe(f"{daemon.root}/health", f"{daemon.root}/availability")
    probe.wait_json(f"{daemon.root}/health", lambda h: h.get("runtime") == "ready", timeout)
