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
