"""The bench's own MQTT client (paho, MQTT 5): records every message with the monotonic time it arrived.

``on_message`` does as little as possible (a timestamp and two appends), so that the client measures the
bridge and the broker rather than itself. The same client publishes the broker-only baseline, so both
measurements share one receive path.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.procs import LOOPBACK


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    at_ns: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


Hook = Callable[[Msg], None]


class Client:
    def __init__(self, port: int, name: str = "bench") -> None:
        self.port = port
        self.client_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._by_topic: dict[str, list[Msg]] = {}
        self._cond = threading.Condition()
        self._waited: set[str] = set()
        self._hooks: list[Hook] = []
        self._connected = threading.Event()
        self._subacks = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_socket_open = self._on_socket_open
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)

    # -- lifecycle --

    def start(self, timeout: float = 10.0) -> Client:
        self._client.connect(LOOPBACK, self.port, keepalive=60, clean_start=True)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise RuntimeError(f"the bench client could not connect to {LOOPBACK}:{self.port}")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks (network thread) --

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the bridge does

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_subscribe(self, *args: Any) -> None:
        with self._cond:
            self._subacks += 1
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        msg = Msg(message.topic, bytes(message.payload), time.monotonic_ns(), bool(message.retain))
        with self._cond:
            self._by_topic.setdefault(msg.topic, []).append(msg)
            if msg.topic in self._waited:
                self._cond.notify_all()
        for hook in self._hooks:
            hook(msg)

    # -- use --

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = 10.0) -> None:
        with self._cond:
            target = self._subacks + len(topics)
        for topic in topics:
            self._client.subscribe(topic, qos=qos)
        with self._cond:
            if not self._cond.wait_for(lambda: self._subacks >= target, timeout):
                raise RuntimeError(f"no SUBACK for {topics}")

    def unsubscribe(self, *topics: str) -> None:
        for topic in topics:
            self._client.unsubscribe(topic)

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook`` for every message, on the network thread, after it was recorded."""
        self._hooks.append(hook)

    def remove_hook(self, hook: Hook) -> None:
        with contextlib.suppress(ValueError):
            self._hooks.remove(hook)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        data = payload.encode() if isinstance(payload, str) else payload
        return self._client.publish(topic, data, qos=qos, retain=retain)

    def messages(self, topic: str) -> list[Msg]:
        with self._cond:
            return list(self._by_topic.get(topic, ()))

    def count(self, topic: str) -> int:
        with self._cond:
            return len(self._by_topic.get(topic, ()))

    def topics(self) -> list[str]:
        with self._cond:
            return list(self._by_topic)

    def forget(self, prefix: str) -> None:
        """Drop what was recorded on topics under ``prefix`` (memory of a finished scenario)."""
        with self._cond:
            for topic in [t for t in self._by_topic if t.startswith(prefix)]:
                del self._by_topic[topic]

    def wait_for(
        self, topic: str, predicate: Callable[[Msg], bool] | None = None, *, timeout: float, after_ns: int = 0
    ) -> Msg:
        """The first message on ``topic`` that arrived at or after ``after_ns`` and matches ``predicate``."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            self._waited.add(topic)
            try:
                while True:
                    found = self._by_topic.get(topic, [])
                    for msg in found[checked:]:
                        if msg.at_ns >= after_ns and (predicate is None or predicate(msg)):
                            return msg
                    checked = len(found)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"nothing matching on {topic} within {timeout:g} s")
                    self._cond.wait(remaining)
            finally:
                self._waited.discard(topic)


def json_field(field: str, value: Any) -> Callable[[Msg], bool]:
    """A predicate: the message is a JSON object whose ``field`` equals ``value``."""

    def match(msg: Msg) -> bool:
        try:
            data = msg.json()
        except ValueError:
            return False
        return isinstance(data, dict) and data.get(field) == value

    return match
