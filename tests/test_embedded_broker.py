from __future__ import annotations

import logging
import socket
import struct
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from rkllm_mqtt import exit_codes
from rkllm_mqtt.broker import TESTED_AMQTT_VERSIONS, BrokerStartError, EmbeddedBroker, amqtt_version

from .harness import Probe
from .helpers import eventually, serve_on_a_taken_port, unique_topic


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
    result = serve_on_a_taken_port()
    assert result.returncode == exit_codes.EMBEDDED_BROKER_FAILED
    assert "already in use" in result.stderr
    assert "embedded_defaults" in result.stderr, "the log must say loudly that it runs on the embedded defaults"
    assert "homeassistant_discovery_off" in result.stderr, "the log must say why discovery is off"


# -- the corrections of amqtt (rkllm_mqtt.broker._mosquitto_like_broker), checked with Mosquitto's own clients --


def _mosquitto(tool: str, port: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(port), *args], check=True, capture_output=True, text=True, timeout=timeout
    )


def _hold_retained_configs(port: int, count: int = 16) -> Probe:
    """What a running bridge leaves on the broker: retained discovery configs and a watcher of them."""
    watcher = Probe(port).start()
    watcher.subscribe("homeassistant/#")
    for index in range(count):
        watcher.publish(f"homeassistant/sensor/node/e{index}/config", b'{"name": "entity"}', retain=True)
    watcher.wait_for(lambda msgs: len(msgs) >= count)
    return watcher


@pytest.mark.parametrize("persistent", [False, True], ids=["clean-session", "persistent-session"])
def test_qos0_publish_then_disconnect_is_delivered(amqtt_broker: EmbeddedBroker, persistent: bool) -> None:
    # mosquitto_pub without -q: CONNECT, QoS 0 PUBLISH, DISCONNECT, close. The README's prompt example.
    port = amqtt_broker.port
    watcher = _hold_retained_configs(port)
    topic = f"{unique_topic()}/prompt"
    receiver = Probe(port).start()
    receiver.subscribe(topic)
    session: list[str] = []
    if persistent:
        # A device with a persistent session that holds subscriptions with retained messages.
        session = ["-c", "-i", unique_topic("device")]
        _mosquitto("mosquitto_sub", port, *session, "-q", "1", "-t", "homeassistant/#", "-C", "16")
    try:
        for index in range(5):
            _mosquitto("mosquitto_pub", port, *session, "-t", topic, "-m", f"prompt {index}")
        # Each client is its own connection: nothing orders their routing against another client's, so wait
        # for the messages themselves (amqtt alone lost them: this times out).
        receiver.wait_topic(topic, count=5)
        assert [m.payload for m in receiver.on(topic)] == [f"prompt {index}".encode() for index in range(5)]
    finally:
        receiver.stop()
        watcher.stop()


def _connect_packet(client_id: bytes) -> bytes:
    # MQTT 3.1.1 CONNECT, clean session, keepalive 0.
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


def _publish_packet(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body)]) + body


@pytest.mark.parametrize("close", ["orderly", "abortive"])
def test_connect_publish_disconnect_in_one_write_is_delivered(amqtt_broker: EmbeddedBroker, close: str) -> None:
    # What a small device may send in one TCP segment, without waiting for CONNACK, before it closes. Its kernel
    # answers the CONNACK that arrives after the close with a reset; an abortive close (SO_LINGER 0) sends the
    # reset at once. Either way the PUBLISH has been received and must be routed.
    topic = f"{unique_topic()}/burst"
    count = 20
    receiver = Probe(amqtt_broker.port).start()
    receiver.subscribe(topic)
    try:
        for index in range(count):
            with socket.create_connection((amqtt_broker.host, amqtt_broker.port), timeout=10) as device:
                if close == "abortive":
                    device.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                packet = _publish_packet(topic.encode(), f"m{index}".encode())
                device.sendall(_connect_packet(unique_topic("dev").encode()) + packet + b"\xe0\x00")
        # amqtt alone dropped every one of them, and later some whenever it saw the reset first
        receiver.wait_topic(topic, count=count)
        assert sorted(m.payload for m in receiver.on(topic)) == sorted(f"m{index}".encode() for index in range(count))
    finally:
        receiver.stop()


def test_a_new_client_gets_retained_messages_only_for_its_own_subscriptions(amqtt_broker: EmbeddedBroker) -> None:
    port = amqtt_broker.port
    watcher = _hold_retained_configs(port)
    topic = f"{unique_topic()}/bar"
    try:
        _mosquitto("mosquitto_pub", port, "-r", "-q", "1", "-t", topic, "-m", "mine")
        # amqtt alone sent the watcher's 16 retained configs first: -C 1 printed one of them.
        first = _mosquitto("mosquitto_sub", port, "-t", topic, "-C", "1", "-v")
        assert first.stdout.strip() == f"{topic} mine"
    finally:
        watcher.stop()


def test_a_resumed_session_gets_retained_messages_only_when_it_subscribes(amqtt_broker: EmbeddedBroker) -> None:
    port = amqtt_broker.port
    topic = f"{unique_topic()}/state"
    client_id = unique_topic("resume")
    _mosquitto("mosquitto_pub", port, "-r", "-q", "1", "-t", topic, "-m", "retained")
    _mosquitto("mosquitto_sub", port, "-c", "-i", client_id, "-q", "1", "-t", topic, "-C", "1")
    resumed = Probe(port, client_id=client_id, persistent=True).start()
    try:
        resumed.subscribe(f"{topic}/end")
        resumed.publish(f"{topic}/end", b"sentinel")
        resumed.wait_topic(f"{topic}/end")
        assert resumed.on(topic) == [], "Mosquitto sends retained messages on SUBSCRIBE, not on reconnect"
        resumed.subscribe(topic)
        assert [m.payload for m in resumed.wait_topic(topic)] == [b"retained"]
    finally:
        resumed.stop()


def test_the_corrections_are_pinned_to_the_tested_amqtt() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert amqtt_version() in TESTED_AMQTT_VERSIONS
    assert f'"amqtt=={amqtt_version()}"' in pyproject


def test_a_port_check_without_connect_is_not_an_error_in_the_log(
    amqtt_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # What ask and doctor do before they connect, and monitoring tools all the time: open the port, close it.
    caplog.set_level(logging.DEBUG, logger="amqtt.broker")

    def closed_before_connect() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "amqtt.broker" and "No data" in r.getMessage()]

    with socket.create_connection(("127.0.0.1", amqtt_broker.port)):
        pass
    # amqtt did see it, and said so twice (an error, then a warning), both now at debug.
    assert eventually(lambda: len(closed_before_connect()) == 2)
    assert [r.levelname for r in closed_before_connect()] == ["DEBUG", "DEBUG"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
