"""The transport's own parts: the inbox hand-over, the per-request publish properties, the connect race, and
batched writes through a real Mosquitto."""

from __future__ import annotations

import signal
import threading
from functools import partial
from pathlib import Path

import pytest
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.transport import IncomingMessage, MqttTransport
from rkllm_mqtt.settings import MqttSettings

from .harness import Mosquitto, Probe, mosquitto_binary
from .helpers import unique_topic


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


def test_a_publish_racing_the_connect_never_goes_out_ahead_of_connect() -> None:
    """paho installs a new socket and only then queues CONNECT; a publish from another thread in between used to
    reach the broker first (amqtt then never answered, and the bridge stayed unconnected)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    first_bytes: list[bytes] = []

    def accept_one() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            first_bytes.append(conn.recv(1))

    acceptor = threading.Thread(target=accept_one, daemon=True)
    acceptor.start()
    t = MqttTransport(
        MqttSettings(port=port),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=lambda m: None,
        on_connected=lambda: None,
        force_protocol="3.1.1",
    )
    opened, published = threading.Event(), threading.Event()
    socket_opened = t._on_socket_open

    def hold_the_window_open(client: object, userdata: object, sock: object) -> None:
        # Between the new socket and CONNECT: let a publish from another thread try its luck here.
        opened.set()
        published.wait(2.0)  # without the gate the publish completes at once; with it, it cannot until we return
        socket_opened(client, userdata, sock)  # type: ignore[arg-type]

    t._on_socket_open = hold_the_window_open  # type: ignore[method-assign]

    def publish_when_the_socket_opens() -> None:
        opened.wait(30)
        t.publish("rkllm/n/state", b"{}", qos=1)
        published.set()

    publisher = threading.Thread(target=publish_when_the_socket_opens, daemon=True)
    publisher.start()
    t.start()
    try:
        acceptor.join(30)
        publisher.join(30)
        assert opened.is_set() and published.is_set(), "the premise did not hold: no publish during the connect"
        assert first_bytes and first_bytes[0][0] >> 4 == 1, f"the first packet was not CONNECT: {first_bytes!r}"
    finally:
        t.stop()
        server.close()


def test_a_burst_of_publishes_goes_out_whole_and_in_order_and_acknowledgements_are_counted(tmp_path: Path) -> None:
    """The transport writes queued packets together: messages of every size, some larger than one write, QoS 0
    and 1 mixed, all arrive, each QoS in the order it was published; QoS 1 acknowledgements bring the backlog to 0
    and QoS 0 messages never counted in it."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path)
    broker.start()
    topic = unique_topic("burst")
    probe = Probe(broker.port).start()
    probe.subscribe(topic)
    connected = threading.Event()
    t = MqttTransport(
        MqttSettings(port=broker.port, client_id=unique_topic("tx")),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=lambda message: None,
        on_connected=connected.set,
    )
    acked: list[int] = []
    t.start()
    try:
        assert connected.wait(20)
        count = 1500
        for index in range(count):
            body = f"{index:05d}".encode() + b"x" * (150_000 if index % 500 == 7 else index % 40)
            t.publish(topic, body, qos=index % 2, on_acked=partial(acked.append, index))
        probe.wait_topic(topic, count=count, timeout=60)
        received = [int(m.payload[:5]) for m in probe.on(topic)]
        # In order per QoS, as MQTT promises (QoS 1 messages past the in-flight window wait in paho's queue).
        for qos in (0, 1):
            assert [i for i in received if i % 2 == qos] == list(range(qos, count, 2))
        with probe.cond:
            assert probe.cond.wait_for(lambda: len(acked) == count and t.backlog == 0, 20), (len(acked), t.backlog)
        assert sorted(acked) == list(range(count))
    finally:
        t.stop()
        probe.stop()
        broker.stop()


def test_qos0_messages_written_do_not_count_as_acknowledged_qos1_ones(tmp_path: Path) -> None:
    """The backlog (QoS 1 messages the broker has not acknowledged) decides when the bridge merges chunks and
    answers rejections cheaply. Written QoS 0 messages once took one off it each."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path)
    broker.start()
    connected = threading.Event()
    t = MqttTransport(
        MqttSettings(port=broker.port, client_id=unique_topic("tx")),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=lambda message: None,
        on_connected=connected.set,
    )
    t.start()
    assert broker.proc is not None
    try:
        assert connected.wait(20)
        broker.proc.send_signal(signal.SIGSTOP)  # the broker acknowledges nothing for now
        for _ in range(5):
            t.publish("burst/q1", b"held", qos=1)
        infos = [t.publish("burst/q0", b"sent", qos=0) for _ in range(20)]
        for info in infos:
            assert info is not None
            info.wait_for_publish(20)  # written to the socket
        assert t.backlog == 5
        broker.proc.send_signal(signal.SIGCONT)
        pause = threading.Event()
        for _ in range(3000):  # up to 30 s for the five acknowledgements
            if not t.backlog:
                break
            pause.wait(0.01)
        assert t.backlog == 0
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        t.stop()
        broker.stop()
