"""The transport's own parts that need no broker: the inbox hand-over and the per-request publish properties."""

from __future__ import annotations

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.transport import IncomingMessage, MqttTransport
from rkllm_mqtt.settings import MqttSettings


def transport(received: list[IncomingMessage]) -> MqttTransport:
    return MqttTransport(
        MqttSettings(),
        host="127.0.0.1",
        availability_topic="rkllm/n/availability",
        subscriptions=[],
        on_message=received.append,
        on_connected=lambda: None,
    )


def test_the_properties_of_one_request_are_built_once() -> None:
    t = transport([])
    first = t._properties(b"corr-1", None)
    assert t._properties(b"corr-1", None) is first  # every chunk of the stream reuses them
    other = t._properties(b"corr-2", None)
    assert other is not first
    assert other.CorrelationData == b"corr-2"
    with_topic = t._properties(b"corr-2", "rkllm/reply/x")
    assert with_topic.ResponseTopic == "rkllm/reply/x" and with_topic is not other


def test_paho_messages_are_handed_on_with_their_mqtt5_properties() -> None:
    received: list[IncomingMessage] = []
    t = transport(received)
    message = MQTTMessage(topic=b"rkllm/n/prompt")
    message.payload = b"hi"
    message.properties = Properties(PacketTypes.PUBLISH)
    message.properties.ResponseTopic = "rkllm/reply/me"
    message.properties.CorrelationData = b"c1"
    t._on_message(None, None, message)  # type: ignore[arg-type]
    assert len(received) == 1
    got = received[0]
    assert (got.topic, got.payload, got.retain) == ("rkllm/n/prompt", b"hi", False)
    assert (got.response_topic, got.correlation_data) == ("rkllm/reply/me", b"c1")
