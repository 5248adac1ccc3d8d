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
from .helpers import unique_topic

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
    events = [e.get("event") for e in daemon.logs()]
    assert events.count("mqtt_connected") == 1 and "mqtt_disconnected" not in events


@pytest.mark.parametrize(
    "escape",
    ["\\u0001", "\\u001f", "\\u007f", "\\u0085", "\\ufdd0", "\\uffff", "\\ud83f\\udfff", "\\ud800"],
    ids=["U+0001", "U+001F", "U+007F", "U+0085", "U+FDD0", "U+FFFF", "U+1FFFF", "lone-surrogate"],
)
def test_reply_topic_the_broker_refuses_never_cuts_the_bridge_off(
    tmp_path: Path, stack: list[Any], escape: str
) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    request_id = unique_topic("hostile")
    # The JSON escape reaches the bridge as the character itself, as in the report that found the loop.
    payload = '{"id": "' + request_id + '", "prompt": "hi", "response_topic": "rkllm/reply/x' + escape + '"}'
    mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", payload)

    error = probe.wait_json(f"{daemon.root}/error", lambda e: e.get("id") == request_id)
    assert error["code"] == "forbidden_topic"
    # Answered on its default topic, since its own reply topic cannot be written to.
    final = probe.wait_json(f"{daemon.root}/response/{request_id}", lambda r: True)
    assert final["state"] == "error" and final["error"]["code"] == "forbidden_topic"
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


@pytest.mark.parametrize(
    "payload",
    [
        '{"prompt": "x", "a": ' + "[" * 10000 + "]" * 10000 + "}",
        '{"id": "digits", "prompt": "x", "max_new_tokens": ' + "9" * 5000 + "}",
        '{"id": "nul", "prompt": "a\\u0000b"}',
        '{"id": "big", "prompt": "x", "top_k": 10000000000}',
        '{"id": "tokens", "prompt": "x", "max_new_tokens": 10000000000}',
        '{"id": "inf", "prompt": "x", "temperature": Infinity}',
        '{"id": "sur", "prompt": "x", "system": "\\udc00"}',
    ],
    ids=["deep", "digits", "nul", "int32", "int32-tokens", "infinity", "surrogate"],
)
def test_every_hostile_payload_gets_a_coded_answer(tmp_path: Path, stack: list[Any], payload: str) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    mosquitto_pub(broker_port(stack), f"{daemon.root}/prompt", payload)
    error = probe.wait_json(f"{daemon.root}/error", lambda e: True)
    assert error["code"] in ("invalid_json", "invalid_request")
    if error["id"] is not None:
        final = probe.wait_json(f"{daemon.root}/response/{error['id']}", lambda r: True)
        assert final["error"]["code"] == error["code"]
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


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("abort", b"\xff\xfe"),
        ("abort", b"id\x00"),
        ("abort", b"x" * 100_000),
        ("abort", b"a/+/#"),
        ("clear", b"\xff\xfe"),
        ("clear", b"session\x00"),
        ("clear", b"s" * 129),
    ],
    ids=["abort-utf8", "abort-nul", "abort-big", "abort-not-an-id", "clear-utf8", "clear-nul", "clear-long"],
)
def test_hostile_abort_and_clear_payloads(tmp_path: Path, stack: list[Any], topic: str, payload: bytes) -> None:
    daemon, probe = start(stack, tmp_path, Mosquitto(tmp_path))
    probe.publish(f"{daemon.root}/{topic}", payload)
    error = probe.wait_json(f"{daemon.root}/error", lambda e: e["message"].startswith(f"{topic}:"))
    assert error["code"] in ("invalid_utf8", "invalid_request") and len(error["message"]) < 300
    assert_stayed_connected(daemon, probe, broker_port(stack))


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
