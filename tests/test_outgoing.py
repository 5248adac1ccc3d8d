"""The last gate before paho: what the broker would refuse is never handed to paho, and a refused final is still
answered. Pure functions and the Publisher with a small fake transport; no broker."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.outgoing import MQTT_MAX_REMAINING_LENGTH, publish_packet_size, publish_problem
from rkllm_mqtt.bridge.publisher import Publisher
from rkllm_mqtt.payloads import FinalResponse
from rkllm_mqtt.topics import ReplyTopics, Topics


class _CapturingClient(mqtt.Client):
    """paho's client with its packet queue replaced by a list: the bytes it would put on the wire."""

    def __init__(self, v5: bool) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.packets: list[bytes] = []

    def _packet_queue(self, command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> mqtt.MQTTErrorCode:
        self.packets.append(bytes(packet))
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


class _Socket:
    def close(self) -> None:
        pass


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize(
    ("topic", "payload", "qos", "correlation", "response_topic"),
    [
        ("a/b", b"x" * 10, 1, None, None),
        ("a/ü" * 50, b"y" * 200, 1, b"c" * 300, "r/t"),
        ("t", b"z" * 20000, 0, b"k", None),
        ("t", b"", 1, None, "x" * 200),
        ("t", b"w" * 2_100_000, 1, None, None),
    ],
)
def test_packet_size_is_what_paho_sends(
    v5: bool, topic: str, payload: bytes, qos: int, correlation: bytes | None, response_topic: str | None
) -> None:
    client = _CapturingClient(v5)
    client._sock = _Socket()  # type: ignore[assignment]  # paho only builds a packet when it has a socket
    properties = None
    if v5 and (correlation is not None or response_topic is not None):
        properties = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            properties.CorrelationData = correlation
        if response_topic is not None:
            properties.ResponseTopic = response_topic
    client._send_publish(1, topic.encode(), payload, qos, False, False, None, properties)
    expected = publish_packet_size(
        topic, payload, qos=qos, v5=v5, correlation_data=correlation, response_topic=response_topic
    )
    assert len(client.packets[-1]) == expected


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [("a/\x01", "U+0001"), ("a/\ud800", "U+D800"), ("a/\uffff", "U+FFFF"), ("", "empty"), ("a/+", "wildcard")],
)
def test_topic_the_broker_refuses(topic: str, fragment: str) -> None:
    problem = publish_problem(topic, b"x", qos=1, v5=True)
    assert problem is not None and fragment in problem


def test_response_topic_property_is_checked_on_mqtt5_only() -> None:
    problem = publish_problem("ok/topic", b"x", qos=1, v5=True, response_topic="r/\x07")
    assert problem is not None and "response topic property" in problem
    # On 3.1.1 the property is not sent at all.
    assert publish_problem("ok/topic", b"x", qos=1, v5=False, response_topic="r/\x07") is None


def test_packet_above_the_brokers_maximum() -> None:
    size = publish_packet_size("t/x", b"p" * 990, qos=1, v5=True)
    assert publish_problem("t/x", b"p" * 990, qos=1, v5=True, max_packet_bytes=size) is None
    problem = publish_problem("t/x", b"p" * 991, qos=1, v5=True, max_packet_bytes=size)
    assert problem is not None and "maximum packet size" in problem and str(size) in problem


class _Claimed(bytes):
    """A payload that says it is ``size`` bytes long, so MQTT's 256 MiB limit is tested without allocating it."""

    def __new__(cls, size: int) -> _Claimed:
        claimed = super().__new__(cls, b"")
        claimed.size = size
        return claimed

    def __len__(self) -> int:
        return self.size


def test_packet_above_mqtts_own_limit() -> None:
    largest = MQTT_MAX_REMAINING_LENGTH - (2 + 1 + 2)  # topic length, topic "t", packet id
    assert publish_problem("t", _Claimed(largest), qos=1, v5=False) is None
    problem = publish_problem("t", _Claimed(largest + 1), qos=1, v5=False)
    assert problem is not None and "MQTT's limit" in problem


def test_a_remembered_topic_is_checked_like_a_new_one() -> None:
    for _ in range(2):
        assert publish_problem("r/\x01", b"x", qos=1, v5=True) is not None
        assert publish_problem("r/ok", b"x", qos=1, v5=True) is None
    long_topic = "a" * 70000
    assert publish_problem(long_topic, b"x", qos=1, v5=True) is not None


class _Transport:
    """A transport that refuses what ``refuse`` says, as MqttTransport does: by returning None."""

    def __init__(self, refuse: Any) -> None:
        self.refuse = refuse
        self.sent: list[tuple[str, bytes]] = []

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> object:
        if self.refuse(topic, payload):
            return None
        self.sent.append((topic, payload))
        return object()

    @property
    def backlog(self) -> int:
        return 0


TOPICS = Topics("rkllm", "n")
FINAL = FinalResponse(id="r1", state="done", text="a long answer " * 100, finish_reason="stop", node="n")


def test_a_final_the_broker_refuses_on_its_reply_topic_goes_to_the_default_topic() -> None:
    transport = _Transport(lambda topic, payload: topic.startswith("rkllm/reply/"))
    Publisher(transport, TOPICS).final(ReplyTopics("rkllm/reply/x"), FINAL, None)
    assert transport.sent == [(TOPICS.response("r1"), FINAL.to_json())]


def test_a_final_too_large_for_the_broker_comes_without_its_text() -> None:
    transport = _Transport(lambda topic, payload: len(payload) > 1000)
    Publisher(transport, TOPICS).final(ReplyTopics("rkllm/reply/x"), FINAL, None)
    assert len(transport.sent) == 1
    topic, payload = transport.sent[0]
    answer = FinalResponse.model_validate_json(payload)
    assert topic == TOPICS.response("r1")
    assert answer.state == "error" and answer.text == "" and answer.error is not None
    assert answer.error.code == "response_too_large"


def test_a_final_the_broker_takes_is_sent_once() -> None:
    transport = _Transport(lambda topic, payload: False)
    Publisher(transport, TOPICS).final(ReplyTopics("rkllm/reply/x"), FINAL, None)
    assert transport.sent == [("rkllm/reply/x", FINAL.to_json())]
