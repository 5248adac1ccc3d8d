"""The PUBLISH reader decodes what paho decodes, leaves to paho what it does not handle, and never raises."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.publish_reader import complete_packet, decode_publish, encode_length
from rkllm_mqtt.bridge.transport import _BufferedReads


def _frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def _body(topic: bytes, payload: bytes, *, qos: int, mid: int, properties: Properties | None) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if properties is not None:
        body += properties.pack()
    return body + payload


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@st.composite
def _publishes(draw: st.DrawFn) -> tuple[int, bytes, bool]:
    v5 = draw(st.booleans())
    qos = draw(st.sampled_from([0, 1]))
    first = 0x30 | (qos << 1) | (draw(st.booleans()) << 3) | int(draw(st.booleans()))
    topic = draw(_text.filter(bool)).encode()
    properties = None
    if v5:
        properties = Properties(PacketTypes.PUBLISH)
        if draw(st.booleans()):
            properties.ResponseTopic = draw(_text.filter(bool))
        if draw(st.booleans()):
            properties.CorrelationData = draw(st.binary(max_size=40))
        for key, value in draw(st.lists(st.tuples(_text, _text), max_size=3)):
            properties.UserProperty = (key, value)
        if draw(st.booleans()):
            properties.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
        if draw(st.booleans()):
            properties.PayloadFormatIndicator = draw(st.integers(0, 1))
        if draw(st.booleans()):
            properties.ContentType = draw(_text)
    body = _body(topic, draw(st.binary(max_size=300)), qos=qos, mid=draw(st.integers(1, 65535)), properties=properties)
    return first, body, v5


@settings(max_examples=400, deadline=None)
@given(_publishes())
def test_every_field_the_bridge_reads_is_what_paho_decodes(packet: tuple[int, bytes, bool]) -> None:
    first, body, v5 = packet
    frame = _frame(first, body)
    assert complete_packet(frame, 0) == (first, len(frame) - len(body), len(frame))
    ours = decode_publish(first, body, v5=v5)
    theirs = paho_packet.decode_publish(first, body, MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    assert ours is not None
    assert ours.topic == theirs.topic.decode()
    assert ours.payload == theirs.payload
    assert (ours.qos, ours.retain, ours.dup, ours.mid) == (theirs.qos, theirs.retain, theirs.dup, theirs.mid)
    props = theirs.properties
    assert ours.response_topic == getattr(props, "ResponseTopic", None)
    assert ours.correlation_data == getattr(props, "CorrelationData", None)
    assert list(ours.user_properties) == list(getattr(props, "UserProperty", None) or [])


@settings(max_examples=200, deadline=None)
@given(_publishes(), st.data())
def test_a_packet_cut_anywhere_is_not_taken(packet: tuple[int, bytes, bool], data: st.DataObject) -> None:
    first, body, _ = packet
    frame = _frame(first, body)
    cut = data.draw(st.integers(0, len(frame) - 1))
    assert complete_packet(frame[:cut], 0) is None
    # Packets follow one another: the second one is found after the first.
    assert complete_packet(frame + frame, len(frame)) == (first, 2 * len(frame) - len(body), 2 * len(frame))


def _v5(**values: object) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


@pytest.mark.parametrize(
    ("first", "body", "v5"),
    [
        pytest.param(0x34, _body(b"a/b", b"x", qos=2, mid=7, properties=None), False, id="qos-2"),
        pytest.param(0x20, b"\x00\x00", False, id="not-a-publish"),
        pytest.param(0x30, _body(b"", b"x", qos=0, mid=0, properties=None), False, id="empty-topic-3.1.1"),
        pytest.param(0x30, _body(b"", b"x", qos=0, mid=0, properties=_v5(TopicAlias=3)), True, id="topic-alias"),
        pytest.param(0x30, _body(b"a/\xff", b"x", qos=0, mid=0, properties=None), False, id="topic-not-utf8"),
        pytest.param(0x30, b"\x00\x03a/b\x02\x08\x00", True, id="string-past-the-properties"),
        pytest.param(0x30, b"\x00\x03a/b\x05\x02\x00\x00", True, id="properties-past-the-packet"),
        pytest.param(0x30, b"\x00\x03a/b\x02\x99\x00", True, id="unknown-property"),
        pytest.param(0x32, b"\x00\x03a/", False, id="no-room-for-the-message-id"),
    ],
)
def test_what_it_does_not_handle_is_left_to_paho(first: int, body: bytes, v5: bool) -> None:
    assert decode_publish(first, body, v5=v5) is None


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=200), st.booleans())
def test_no_input_makes_it_raise(first: int, body: bytes, v5: bool) -> None:
    decode_publish(first, body, v5=v5)
    complete_packet(bytes([first]) + body, 0)


class _FailingSocket:
    def __init__(self, data: bytes, error: OSError | None) -> None:
        self.chunks = [data]
        self.error = error

    def recv(self, bufsize: int) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        return b""


@pytest.mark.parametrize("error", [None, ConnectionResetError(104, "reset")], ids=["end-of-stream", "reset"])
def test_an_end_or_error_met_reading_ahead_reaches_paho_after_the_bytes_before_it(error: OSError | None) -> None:
    reads = _BufferedReads(_FailingSocket(b"abc", error))  # type: ignore[arg-type]
    reads.fill()
    assert reads.buffered() == (b"abc", 0)
    reads.fill()  # the buffer is not used up: nothing is read
    reads.consume(3)
    reads.fill()  # meets the end (or the error) and keeps it
    if error is None:
        assert reads.recv(1) == b"" and reads.recv(1) == b""
    else:
        with pytest.raises(ConnectionResetError):
            reads.recv(1)


def test_reading_ahead_with_nothing_arrived_is_not_an_end() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        reads = _BufferedReads(ours)
        reads.fill()
        assert reads.pending() == 0
        theirs.sendall(b"later")
        assert reads.recv(5) == b"later"
    finally:
        ours.close()
        theirs.close()
