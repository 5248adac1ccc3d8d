"""Hostile input against a real Mosquitto, where the broker's own rules matter: a request must never make the bridge
publish something Mosquitto answers by closing the connection (which paho would resend after every reconnect).

Each test sends the hostile message the way a user would (``mosquitto_pub``, or a paho client for an MQTT 5
property), then proves the bridge stayed connected: it answers the next request, its availability topic never
said ``offline`` and it never logged a disconnect.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None or shutil.which("mosquitto_pub") is None, reason="mosquitto is not installed"
)


class _LimitedMosquitto(Mosquitto):
    """Mosquitto with a Maximum Packet Size, which it announces in its MQTT 5 CONNACK and enforces by disconnecting."""

    def __init__(self, workdir: Path, max_packet_size: int) -> None:
        super().__init__(workdir)
        self.max_packet_size = max_packet_size

    def _auth_lines(self) -> str:
        return super()._auth_lines() + f"max_packet_size {self.max_packet_size}\n"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[list[Any]]:
    """Everything a test starts, stopped in reverse order."""
    started: list[Any] = []
    yield started
    for part in reversed(started):
        part.stop()


def start(stack: list[Any], tmp_path: Path, broker: Mosquitto, **sections: dict[str, Any]) -> tuple[Daemon, Probe]:
    broker.start()
    stack.append(broker)
    probe = Probe(broker.port, v5=True).start()
    stack.append(probe)
    sections.setdefault("mqtt", {})["protocol"] = "5"
    daemon = Daemon(tmp_path, broker.port, **sections).start()
    stack.append(daemon)
    wait_ready(probe, daemon)
    probe.subscribe(f"{daemon.root}/#", "rkllm/reply/#")
    return daemon, probe


def mosquitto_pub(port: int, topic: str, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-m", payload],
        check=True,
        timeout=30,
    )


def assert_stayed_connected(daemon: Daemon, probe: Probe, port: int) -> None:
    """The bridge answers a request sent after the hostile ones, and never lost its connection on the way."""
    mosquitto_pub(
        port, f"{daemon.root}/prompt", json.dumps({"id": "after", "prompt": "still there?", "max_new_tokens": 5})
    )
    assert probe.wait_json(f"{daemon.root}/response/after", lambda r: True)["state"] == "done"
    # Each subscription delivers the retained "online", and the first connect may be seen live; a reconnect would
    # add the Will's "offline" and one more live "online".
    availability = [(m.payload, m.retain) for m in probe.on(f"{daemon.root}/availability")]
    assert {payload for payload, _ in availability} == {b"online"}, availability
    assert sum(1 for _, retained in availability if not retained) <= 1, availability
    # Both of the daemon's connections (prompts, and "-ctl" for abort and clear) connect once and stay.
    connects = [str(e.get("client_id")) for e in daemon.logs() if e.get("event") == "mqtt_connected"]
    assert len(connects) == 2 and len(set(connects)) == 2, connects
    assert "mqtt_disconnected" not in [e.get("event") for e in daemon.logs()]


# Characters Mosquitto refuses in a topic name, as JSON escapes: they reach the bridge as the characters themselves,
# as in the report that found the reconnect loop.
REFUSED_ESCAPES = {
    "u0001": "\\u0001",
    "u001f": "\\u001f",
    "u007f": "\\u007f",
    "u0085": "\\u0085",
    "ufdd0": "\\ufdd0",
    "uffff": "\\uffff",
    "u1ffff": "\\ud83f\\udfff",
    "lone-surrogate": "\\ud800",
}


def test_reply_topic_the_broker_refuses_never_cuts_the_bridge_off(tmp_path: Path, stack: list[Any]) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    for name, escape in REFUSED_ESCAPES.items():
        payload = '{"id": "' + name + '", "prompt": "hi", "response_topic": "rkllm/reply/x' + escape + '"}'
        mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", payload)
    for name in REFUSED_ESCAPES:
        error = probe.wait_json(f"{daemon.root}/error", lambda e, rid=name: e.get("id") == rid)
        assert error["code"] == "forbidden_topic", (name, error)
        # Answered on its default topic, since its own reply topic cannot be written to.
        final = probe.wait_json(f"{daemon.root}/response/{name}", lambda r: True)
        assert final["state"] == "error" and final["error"]["code"] == "forbidden_topic", (name, final)
    assert_stayed_connected(daemon, probe, broker_port(stack))
    assert not [m for m in probe.messages if m.topic.startswith("rkllm/reply/")]


def test_reply_topic_of_64_kib_by_field_and_by_property(tmp_path: Path, stack: list[Any]) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    topic = "rkllm/reply/" + "a" * (65528 - len("rkllm/reply/"))
    field = {"id": "long-field", "prompt": "hi", "response_topic": topic}
    mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", json.dumps(field))
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "long-property", "prompt": "hi"}), response_topic=topic)
    for request_id in ("long-field", "long-property"):
        error = probe.wait_json(f"{daemon.root}/error", lambda e, rid=request_id: e.get("id") == rid)
        assert error["code"] == "forbidden_topic" and "max_reply_topic_bytes" in error["message"]
        final = probe.wait_json(f"{daemon.root}/response/{request_id}", lambda r: True)
        assert final["error"]["code"] == "forbidden_topic"
    assert_stayed_connected(daemon, probe, broker_port(stack))


# Nested too deep to be read at all: its id stays unknown, so only the error topic can hear of it.
TOO_DEEP = '{"id": "deep", "prompt": "x", "a": ' + "[" * 10000 + "]" * 10000 + "}"
HOSTILE_PAYLOADS = {
    "digits": '{"id": "digits", "prompt": "x", "max_new_tokens": ' + "9" * 5000 + "}",
    "nul": '{"id": "nul", "prompt": "a\\u0000b"}',
    "int32": '{"id": "int32", "prompt": "x", "top_k": 10000000000}',
    "int32-tokens": '{"id": "int32-tokens", "prompt": "x", "max_new_tokens": 10000000000}',
    "infinity": '{"id": "infinity", "prompt": "x", "temperature": Infinity}',
    "absurd": '{"id": "absurd", "prompt": "x", "repeat_penalty": 1e308}',
    "surrogate": '{"id": "surrogate", "prompt": "x", "system": "\\udc00"}',
}


def test_every_hostile_payload_gets_a_coded_answer(tmp_path: Path, stack: list[Any]) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", TOO_DEEP)
    error = probe.wait_json(f"{daemon.root}/error", lambda e: True)
    assert error["code"] == "invalid_json" and "10001 levels" in error["message"] and error["id"] is None
    for payload in HOSTILE_PAYLOADS.values():
        mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", payload)
    for name in HOSTILE_PAYLOADS:
        error = probe.wait_json(f"{daemon.root}/error", lambda e, rid=name: e.get("id") == rid)
        assert error["code"] in ("invalid_json", "invalid_request"), (name, error)
        final = probe.wait_json(f"{daemon.root}/response/{name}", lambda r: True)
        assert final["error"]["code"] == error["code"], (name, final)
    assert_stayed_connected(daemon, probe, broker_port(stack))
    # A client's mistake is not the runtime's problem.
    health = probe.on(f"{daemon.root}/health")[-1].json()
    assert health["last_error"] is None


def test_final_larger_than_the_brokers_maximum_packet(tmp_path: Path, stack: list[Any]) -> None:
    broker = _LimitedMosquitto(tmp_path, max_packet_size=1024)
    daemon, probe = start(
        stack, tmp_path, broker, runtime={"model_path": "sim:rate=0,prefill_ms=0,tokens=300", "library": "sim"}
    )
    mosquitto_pub(broker.port, f"{daemon.root}/prompt", json.dumps({"id": "huge", "prompt": "hi", "stream": False}))
    final = probe.wait_json(f"{daemon.root}/response/huge", lambda r: True)
    assert final["state"] == "error" and final["text"] == ""
    assert final["error"]["code"] == "response_too_large"
    refused = [e for e in daemon.logs() if e.get("event") == "mqtt_publish_refused"]
    assert refused and all("maximum packet size" in e["reason"] for e in refused)
    # The small request after it still fits and is answered: nothing oversize was left in paho's session.
    assert_stayed_connected(daemon, probe, broker.port)


def _raw_publish_with_surrogate_response_topic(port: int, topic: str) -> bytes:
    """An MQTT 5 PUBLISH whose Response Topic property is a UTF-8-encoded lone surrogate (ED A0 80).

    paho refuses to encode such a string, so the packet is built by hand. Returns what the broker sent back
    before closing the connection (b"" when it closed it at once)."""

    def string(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    def packet(first: int, body: bytes) -> bytes:
        assert len(body) < 128  # one-byte remaining length
        return bytes([first, len(body)]) + body

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connect = string(b"MQTT") + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00" + string(b"hostile-raw")
        sock.sendall(packet(0x10, connect))
        assert sock.recv(64)[:1] == b"\x20"  # CONNACK
        properties = b"\x08" + string(b"rkllm/reply/\xed\xa0\x80")
        body = string(topic.encode()) + struct.pack("!H", 1) + bytes([len(properties)]) + properties + b"hi"
        sock.sendall(packet(0x32, body))
        return sock.recv(64)


def test_lone_surrogate_in_the_response_topic_property_never_reaches_the_bridge(
    tmp_path: Path, stack: list[Any]
) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    # Mosquitto checks the property's UTF-8 itself and closes the sender's connection without a PUBACK; the
    # bridge's own check of the property (tests/test_requests.py) is for brokers that let it through.
    answer = _raw_publish_with_surrogate_response_topic(broker_port(stack), f"{daemon.root}/prompt")
    assert not answer.startswith(b"\x40")  # no PUBACK: the message was refused, not delivered
    assert_stayed_connected(daemon, probe, broker_port(stack))
    assert not [m for m in probe.on(f"{daemon.root}/error")]


def test_no_request_can_raise_a_limit(tmp_path: Path, stack: list[Any]) -> None:
    daemon, probe = start(
        stack,
        tmp_path,
        Mosquitto(tmp_path),
        runtime={"model_path": "sim:rate=0,prefill_ms=0,tokens=40", "library": "sim", "max_new_tokens": 5},
        limits={"max_system_bytes": 64},
    )
    for request_id, asked in (("more", 100), ("far-more", 1_000_000_000)):
        body = {"id": request_id, "prompt": "count", "max_new_tokens": asked}
        mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", json.dumps(body))
        final = probe.wait_json(f"{daemon.root}/response/{request_id}", lambda r: True)
        assert final["usage"]["completion_tokens"] == 5 and final["finish_reason"] == "length", final
    body = {"id": "long-system", "prompt": "hi", "system": "s" * 65}
    mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", json.dumps(body))
    final = probe.wait_json(f"{daemon.root}/response/long-system", lambda r: True)
    assert final["error"]["code"] == "prompt_too_long" and "limits.max_system_bytes" in final["error"]["message"]


def broker_port(stack: list[Any]) -> int:
    return next(part.port for part in stack if isinstance(part, Mosquitto))
