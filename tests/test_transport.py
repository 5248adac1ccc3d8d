"""The transport's own parts: the inbox hand-over, the per-request publish properties, the connect race, the
buffered reads from the broker and the batched writes to it (over real sockets and a real broker)."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.publish_reader import Publish, encode_length
from rkllm_mqtt.bridge.transport import (
    IncomingMessage,
    MqttTransport,
    Subscription,
    _BufferedReads,
    _Client,
    _WakeReader,
    _WakeState,
    _WakeWriter,
)
from rkllm_mqtt.settings import MqttSettings

from .harness import Mosquitto, Probe, mosquitto_binary
from .helpers import eventually, unique_topic


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


def test_a_receiver_that_fails_on_one_message_holds_back_nothing() -> None:
    """An exception from the receiver is logged, not raised into paho's loop (which would end), and the message is
    acknowledged: unsettled, it would hold back the acknowledgement of every later prompt."""
    received: list[IncomingMessage] = []

    def receive(message: IncomingMessage) -> None:
        if message.payload == b"bad":
            raise RuntimeError("a bug in the receiver")
        received.append(message)

    t = MqttTransport(
        MqttSettings(),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=receive,
        on_connected=lambda: None,
        manual_ack=True,
    )
    client = t._build_client()
    acked: list[int] = []
    client.ack = lambda mid, qos: acked.append(mid)  # type: ignore[method-assign]
    t._client = client
    for mid, payload in [(1, b"good"), (2, b"bad"), (3, b"good")]:
        t._on_incoming(Publish(topic="rkllm/n/prompt", payload=payload, qos=1, retain=False, dup=False, mid=mid))
    assert [m.payload for m in received] == [b"good", b"good"]
    for message in received:
        t.settle(message.delivery)
    assert acked == [1, 2, 3]


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


def _publishing_transport(port: int, connected: threading.Event, keepalive_s: int = 30) -> MqttTransport:
    return MqttTransport(
        MqttSettings(port=port, client_id=unique_topic("tx"), keepalive_s=keepalive_s),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=lambda message: None,
        on_connected=connected.set,
    )


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
    t = _publishing_transport(broker.port, connected)
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
        assert eventually(lambda: len(acked) == count and t.backlog == 0), (len(acked), t.backlog)
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
    t = _publishing_transport(broker.port, connected)
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
        assert eventually(lambda: t.backlog == 0)  # the five acknowledgements
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        t.stop()
        broker.stop()


# -- reading from the broker: many packets from one read ------------------------------------------------------


def publish_frame(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH as MQTT 3.1.1 puts it on the wire."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    return b"\x30" + encode_length(len(body)) + body


def read_packet(sock: _BufferedReads) -> bytes:
    """One packet read the way paho reads it: its first byte, its length a byte at a time, then the rest."""
    packet = sock.recv(1)
    length, shift = 0, 0
    while True:
        byte = sock.recv(1)
        packet += byte
        length += (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    end = len(packet) + length
    while len(packet) < end:
        packet += sock.recv(end - len(packet))
    return packet


class CountingSocket(socket.socket):
    """A real socket that counts the reads that reach it."""

    reads = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.reads += 1
        return super().recv(bufsize, flags)


@pytest.fixture
def socket_pair() -> Iterator[tuple[CountingSocket, socket.socket]]:
    ours, theirs = socket.socketpair()
    counting = CountingSocket(fileno=ours.detach())
    yield counting, theirs
    counting.close()
    theirs.close()


def test_packets_arriving_together_are_read_from_the_socket_once(
    socket_pair: tuple[CountingSocket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    sock = _BufferedReads(ours)
    frames = [publish_frame("a/b", b"x"), publish_frame("a/b", b"y" * 300), b"\xd0\x00"]  # the 2nd: 2 length bytes
    theirs.sendall(b"".join(frames))
    assert sock.pending() == 0
    assert read_packet(sock) == frames[0]
    assert sock.pending() == len(frames[1]) + len(frames[2])  # they arrived with the first and are kept
    assert read_packet(sock) == frames[1]
    assert sock.pending() == len(frames[2])
    assert read_packet(sock) == frames[2]
    assert sock.pending() == 0
    assert ours.reads == 1
    # With nothing kept and nothing arrived, a non-blocking read says so as the socket does.
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    assert ours.reads == 2


def test_a_read_never_waits_for_more_than_is_kept(socket_pair: tuple[CountingSocket, socket.socket]) -> None:
    ours, theirs = socket_pair
    sock = _BufferedReads(ours)
    frame = publish_frame("a/b", b"z" * 100)
    theirs.sendall(frame[:50])
    assert sock.recv(2) == frame[:2]
    assert sock.recv(1000) == frame[2:50]  # what is kept, as a socket returns what has arrived
    theirs.sendall(frame[50:])
    assert sock.recv(1000) == frame[50:]
    assert ours.reads == 2


def test_the_end_of_the_stream_comes_after_the_packets_received_before_it(
    socket_pair: tuple[CountingSocket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    sock = _BufferedReads(ours)
    frames = [publish_frame("last/words", b"1"), publish_frame("last/words", b"2")]
    theirs.sendall(b"".join(frames))
    theirs.close()
    assert read_packet(sock) == frames[0]
    assert read_packet(sock) == frames[1]
    assert sock.recv(1) == b""
    assert sock.recv(1) == b""


def test_everything_but_reads_is_the_sockets_own(socket_pair: tuple[CountingSocket, socket.socket]) -> None:
    ours, theirs = socket_pair
    sock = _BufferedReads(ours)
    assert sock.fileno() == ours.fileno()
    assert sock.getsockname() == ours.getsockname()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 16
    assert select.select([sock], [], [], 0)[0] == []
    assert sock.send(b"\xc0\x00") == 2  # PINGREQ
    assert theirs.recv(2) == b"\xc0\x00"
    theirs.sendall(b"\xd0\x00")
    assert select.select([sock], [], [], 30)[0] == [sock]
    sock.close()
    assert ours.fileno() == -1


def test_a_burst_read_ahead_is_handed_on_without_waiting_for_more() -> None:
    """The broker's packets come in one segment and are read at once: all of them reach the receiver although the
    socket has nothing left to wake select() with (only pending() tells paho they are there)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    received: list[IncomingMessage] = []
    arrived = threading.Condition()
    connected = threading.Event()

    def on_message(message: IncomingMessage) -> None:
        with arrived:
            received.append(message)
            arrived.notify_all()

    t = MqttTransport(
        MqttSettings(port=server.getsockname()[1]),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=on_message,
        on_connected=connected.set,
        force_protocol="3.1.1",
    )
    t.start()
    conn: socket.socket | None = None
    try:
        conn, _ = server.accept()
        conn.settimeout(30)
        assert read_packet(_BufferedReads(conn))[0] >> 4 == 1  # CONNECT
        conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
        assert connected.wait(30)
        assert isinstance(t._client.socket() if t._client else None, _BufferedReads)
        burst = [f"{i:04d}".encode() for i in range(300)]
        conn.sendall(b"".join(publish_frame("burst", payload) for payload in burst))
        with arrived:
            assert arrived.wait_for(lambda: len(received) >= len(burst), 30), f"{len(received)} arrived"
        conn.sendall(publish_frame("after", b"one more"))
        with arrived:
            assert arrived.wait_for(lambda: len(received) > len(burst), 30), "the next packet did not arrive"
        assert [m.payload for m in received] == [*burst, b"one more"]
    finally:
        t.stop()
        if conn is not None:
            conn.close()
        server.close()


def test_a_flood_still_lets_pahos_loop_come_round() -> None:
    """Packets read ahead are handed on in one pass of paho's loop, but a pass reads from the socket at most twice
    however much keeps arriving: between passes the loop sends its PINGREQ and sees a request to stop."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    client = _Client(CallbackAPIVersion.VERSION2, client_id=unique_topic("flood"), protocol=mqtt.MQTTv311)
    received: list[bytes] = []
    client.on_message = lambda c, userdata, message: received.append(message.payload)
    client.connect("127.0.0.1", server.getsockname()[1], 30)
    conn, _ = server.accept()
    try:
        conn.settimeout(30)
        assert read_packet(_BufferedReads(conn))[0] >> 4 == 1  # CONNECT
        burst = [f"{i:06d}".encode() for i in range(30_000)]  # 630 kB, ten reads at least
        flood = b"\x20\x02\x00\x00" + b"".join(publish_frame("flood/topic", payload) for payload in burst)
        threading.Thread(target=conn.sendall, args=(flood,), daemon=True).start()
        sock = client.socket()
        assert isinstance(sock, _BufferedReads)
        passes = 0
        deadline = time.monotonic() + 60  # a stop for a broken loop, not a measure
        while len(received) < len(burst) and time.monotonic() < deadline:
            reads = sock.reads
            assert client.loop(5) == MQTTErrorCode.MQTT_ERR_SUCCESS
            assert sock.reads - reads <= 2
            passes += 1
        assert received == burst
        assert passes < len(burst) / 10  # many packets a pass
    finally:
        client.disconnect()
        conn.close()
        server.close()


needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=needs_mosquitto)])
def broker_port(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    if request.param == "amqtt":
        yield request.getfixturevalue("amqtt_broker").port
        return
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker.port
    broker.stop()


def raw_publisher(port: int) -> socket.socket:
    """A connected MQTT 3.1.1 client that writes its packets itself, so a burst leaves in one write."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    client_id = unique_topic("burst").encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    sock.sendall(b"\x10" + encode_length(len(body)) + body)
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        assert chunk, "the broker closed the connection"
        connack += chunk
    assert connack[0] == 0x20 and connack[3] == 0, f"refused: {connack!r}"
    return sock


def test_a_burst_of_small_publishes_all_arrive_and_so_does_the_next(broker_port: int) -> None:
    base = unique_topic("flood")
    # A retained marker shows when the transport's subscription is in place.
    probe = Probe(broker_port).start()
    probe.publish(f"{base}/marker", b"subscribed", retain=True)
    probe.stop()
    received: list[IncomingMessage] = []
    arrived = threading.Condition()

    def on_message(message: IncomingMessage) -> None:
        with arrived:
            received.append(message)
            arrived.notify_all()

    def burst_arrived(count: int) -> bool:
        return sum(1 for m in received if m.topic == f"{base}/burst") >= count

    t = MqttTransport(
        MqttSettings(port=broker_port),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[Subscription(f"{base}/#", qos=0)],
        on_message=on_message,
        on_connected=lambda: None,
        force_protocol="3.1.1",
    )
    t.start()
    publisher = raw_publisher(broker_port)
    try:
        with arrived:
            assert arrived.wait_for(lambda: any(m.topic == f"{base}/marker" for m in received), 30), "not subscribed"
        sock = t._client.socket() if t._client else None
        assert isinstance(sock, _BufferedReads)
        # The transport's own socket options reach the real socket through the buffer.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        burst = [f"{i:04d}".encode() for i in range(300)]
        publisher.sendall(b"".join(publish_frame(f"{base}/burst", payload) for payload in burst))
        with arrived:
            assert arrived.wait_for(lambda: burst_arrived(len(burst)), 60), f"{len(received)} arrived"
        publisher.sendall(publish_frame(f"{base}/after", b"one more"))
        with arrived:
            assert arrived.wait_for(lambda: any(m.topic == f"{base}/after" for m in received), 30), "no next message"
        assert [m.payload for m in received if m.topic == f"{base}/burst"] == burst
    finally:
        publisher.sendall(b"\xe0\x00")  # DISCONNECT
        publisher.close()
        t.stop()


# -- waking paho's loop: one byte on its way at a time ----------------------------------------------------------


def test_publishers_write_one_wake_byte_until_the_loop_reads_it() -> None:
    reader_end, writer_end = socket.socketpair()
    state = _WakeState()
    writer, reader = _WakeWriter(writer_end, state), _WakeReader(reader_end, state)
    try:
        for _ in range(100):
            assert writer.send(b"0") == 1
        assert reader.recv(10000) == b"0"  # a hundred packets queued, one wake-up
        writer.send(b"0")  # queued after the loop read the pair: it must wake the loop again
        assert reader.recv(10000) == b"0"
    finally:
        reader_end.close()
        writer_end.close()


class _PublishedDuringTheRead:
    """The loop's end of the pair, with a publisher queueing a packet at the moment the loop reads it."""

    def __init__(self, sock: socket.socket, publish: Callable[[], None]) -> None:
        self.sock = sock
        self.publish = publish

    def recv(self, bufsize: int) -> bytes:
        self.publish()
        return self.sock.recv(bufsize)


@pytest.mark.parametrize("before", [True, False], ids=["byte-pending", "nothing-pending"])
def test_a_packet_queued_while_the_loop_reads_the_pair_is_never_left_without_a_wake_up(before: bool) -> None:
    reader_end, writer_end = socket.socketpair()
    reader_end.setblocking(False)
    state = _WakeState()
    writer = _WakeWriter(writer_end, state)
    reader = _WakeReader(_PublishedDuringTheRead(reader_end, lambda: writer.send(b"0")), state)  # type: ignore[arg-type]
    try:
        if before:
            writer.send(b"0")
        with contextlib.suppress(BlockingIOError):
            reader.recv(10000)
        # The loop now writes what was queued so far and goes back to select(). A packet queued after that must
        # find a byte in the pair, its own or one still on its way.
        writer.send(b"0")
        readable, _, _ = select.select([reader_end], [], [], 0)
        assert readable, "packets queued and nothing to wake the loop"
    finally:
        reader_end.close()
        writer_end.close()


def test_publishes_from_many_threads_all_go_out_also_after_the_loop_fell_asleep(tmp_path: Path) -> None:
    """Bursts from three threads (paho's loop busy) and single messages after a pause (its loop asleep in
    select): every one arrives, although most publishes write no wake-up byte."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path)
    broker.start()
    topic = unique_topic("wake")
    probe = Probe(broker.port).start()
    probe.subscribe(topic)
    connected = threading.Event()
    # paho's loop wakes every keepalive / 4 anyway: with an hour, a lost wake-up shows as a message never sent.
    t = _publishing_transport(broker.port, connected, keepalive_s=3600)
    t.start()
    try:
        assert connected.wait(20)
        per_thread = 600

        def burst(first: int) -> None:
            for index in range(first, first + per_thread):
                t.publish(topic, str(index).encode(), qos=index % 2)

        threads = [threading.Thread(target=burst, args=(n * per_thread,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        probe.wait_topic(topic, count=3 * per_thread, timeout=60)
        for extra in range(3):  # one at a time, each once the loop is idle again
            before = len(probe.on(topic))
            assert eventually(lambda: t.unsent == 0 and t.backlog == 0)
            t.publish(topic, f"late-{extra}".encode(), qos=0)
            probe.wait_topic(topic, count=before + 1, timeout=60)
        payloads = sorted(m.payload for m in probe.on(topic))
        expected = sorted([str(i).encode() for i in range(3 * per_thread)] + [f"late-{n}".encode() for n in range(3)])
        assert payloads == expected
    finally:
        t.stop()
        probe.stop()
        broker.stop()
