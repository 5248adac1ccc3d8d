from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from rkllm_mqtt.broker import BrokerStartError, EmbeddedBroker

from .helpers import unique_topic


def test_embedded_broker_routes_messages(amqtt_broker: EmbeddedBroker) -> None:
    topic = f"{unique_topic()}/hello"
    received = threading.Event()
    payloads: list[bytes] = []

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == topic:
            payloads.append(message.payload)
            received.set()

    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(amqtt_broker.host, amqtt_broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(60)
        client.publish(topic, b"world", qos=1).wait_for_publish(60)
        assert received.wait(60)
        assert payloads == [b"world"]
    finally:
        client.loop_stop()
        client.disconnect()


def test_taken_port_is_reported_not_hung() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"port {port}.*already in use"):
            EmbeddedBroker("127.0.0.1", port).start()


def test_serve_exits_non_zero_when_the_embedded_port_is_taken() -> None:
    import os
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
        env["RKLLM_MQTT_MQTT__PORT"] = str(port)
        result = subprocess.run(
            [sys.executable, "-m", "rkllm_mqtt", "serve"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert result.returncode != 0
    assert "already in use" in result.stderr
    assert "embedded_defaults" in result.stderr, "the log must say loudly that it runs on the embedded defaults"
