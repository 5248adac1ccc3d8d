"""The bridge's topic and packet-size rules checked against a real Mosquitto, topic by topic.

Every topic ``topic_name_problem`` lets through must be one Mosquitto takes in a PUBLISH: one it refuses would close
the bridge's connection, and paho would send it again after every reconnect. The other way round the rules may be
stricter (a leading ``$``, the level and length caps), but never about characters: a character the rules refuse is
one Mosquitto refuses too. Each topic goes out in a hand-built MQTT 5 PUBLISH on a fresh connection, so a topic
paho could not even encode (a lone surrogate) is tried as well; the answer is a PUBACK or a closed connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllm_mqtt.bridge.outgoing import publish_packet_size, publish_problem
from rkllm_mqtt.topics import MAX_TOPIC_LEVELS, topic_name_problem

from .harness import Mosquitto, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

PUBACK = 0x40


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _read_packet_type(sock: socket.socket) -> int | None:
    """The type of the next packet from the broker, None when it closed the connection instead."""
    try:
        head = sock.recv(1)
    except ConnectionResetError:
        return None
    return head[0] & 0xF0 if head else None


def mosquitto_takes(port: int, topic: str, payload: bytes = b"x") -> bool:
    """True when Mosquitto acknowledges a QoS 1 PUBLISH to ``topic`` rather than closing the connection."""
    encoded = topic.encode("utf-8", errors="surrogatepass")  # a lone surrogate goes out as the bytes ED A0 80
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connect = _string(b"MQTT") + bytes([5, 0x02]) + struct.pack("!H", 30) + _varint(0) + _string(b"")
        sock.sendall(_packet(0x10, connect))
        assert _read_packet_type(sock) == 0x20, "no CONNACK"
        sock.recv(64)  # the rest of the CONNACK
        publish = _string(encoded) + struct.pack("!H", 1) + _varint(0) + payload
        sock.sendall(_packet(0x32, publish))
        return _read_packet_type(sock) == PUBACK


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(Path(tmp_path_factory.mktemp("rules")))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


# Characters at and around every boundary of the rules, mixed with plain ones, separators and wildcards.
BOUNDARY = [chr(code) for code in (0x0, 0x1, 0x1F, 0x20, 0x7E, 0x7F, 0x9F, 0xA0, 0xD7FF, 0xE000, 0xFDCF, 0xFDD0)]
BOUNDARY += [chr(code) for code in (0xFDEF, 0xFDF0, 0xFFFD, 0xFFFE, 0xFFFF, 0x1FFFD, 0x1FFFE, 0x10FFFF)]
BOUNDARY += ["\ud800", "\udfff", "/", "+", "#", "$", "a", "é", "\U0001f600"]
topics = st.text(alphabet=st.sampled_from(BOUNDARY) | st.characters(codec=None), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(topic=topics)
def test_the_rules_agree_with_mosquitto(broker: Mosquitto, topic: str) -> None:
    problem = topic_name_problem(topic)
    takes = mosquitto_takes(broker.port, topic)
    if problem is None:
        assert takes, f"the rules allow {topic!r}, Mosquitto closes the connection over it"
    elif "which no topic may contain" in problem:
        assert not takes, f"the rules refuse {topic!r} ({problem}), Mosquitto takes it"


def test_the_level_limit_is_within_mosquittos(broker: Mosquitto) -> None:
    deepest = "/".join(["a"] * MAX_TOPIC_LEVELS)
    assert topic_name_problem(deepest) is None and mosquitto_takes(broker.port, deepest)
    assert topic_name_problem(deepest + "/a") is not None
    # Mosquitto's own limit, measured: 201 levels pass, 202 cost the connection.
    assert mosquitto_takes(broker.port, "/".join(["a"] * 201))
    assert not mosquitto_takes(broker.port, "/".join(["a"] * 202))


def test_the_longest_topic_the_rules_allow_is_taken(broker: Mosquitto) -> None:
    longest = "a" * 65535
    assert topic_name_problem(longest) is None and mosquitto_takes(broker.port, longest)


class _LimitedMosquitto(Mosquitto):
    def _auth_lines(self) -> str:
        return super()._auth_lines() + "max_packet_size 1000\n"


def test_a_packet_the_rules_allow_is_one_mosquitto_takes(tmp_path: Path) -> None:
    """The rules count the whole packet, as MQTT 5 defines Maximum Packet Size; Mosquitto 2.0 is a little laxer
    (it takes up to 2 bytes more), so what the rules allow it takes, and far enough over both refuse."""
    broker = _LimitedMosquitto(tmp_path)
    broker.start()
    try:
        for size in (999, 1000, 1001, 1010):
            # The payload that makes a packet of exactly ``size`` bytes (the length field grows with the payload).
            length = next(n for n in range(size, 0, -1) if publish_packet_size("t/x", b"p" * n, qos=1, v5=True) == size)
            payload = b"p" * length
            allowed = publish_problem("t/x", payload, qos=1, v5=True, max_packet_bytes=1000) is None
            assert allowed is (size <= 1000)
            takes = mosquitto_takes(broker.port, "t/x", payload)
            assert takes or not allowed, size
        assert not takes  # 1010 bytes: Mosquitto closes the connection too
    finally:
        broker.stop()
