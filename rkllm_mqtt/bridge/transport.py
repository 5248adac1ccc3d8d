"""MQTT transport on paho-mqtt 2.x. Knows nothing of the runtime.

- ``protocol = "auto"`` connects with MQTT 5 and falls back to 3.1.1 when the broker refuses the
  protocol or never answers the CONNECT (amqtt ignores an MQTT 5 CONNECT that carries a Will).
- The Last Will marks the node ``offline`` (retained); ``online`` is published on every connect.
- The session is persistent (MQTT 5 session expiry / 3.1.1 clean session off) and subscriptions
  are QoS 1, so prompts sent while the bridge is briefly away are delivered when it returns.
- Reconnecting is paho's job (exponential ``reconnect_delay_set``); QoS 1 publishes made while
  disconnected stay in paho's queue and go out after the reconnect.
- paho's callbacks run on its network thread and only hand messages on.
- The broker's packets are read from the socket many at a time (``_BufferedReads``), not a few bytes per call.
- With ``manual_ack`` a QoS 1 message is acknowledged only when its receiver settles it
  (:meth:`MqttTransport.settle`), in the order the messages arrived (:mod:`rkllm_mqtt.bridge.acks`): a message
  the daemon had not settled when it died is sent again by the broker. docs/reliability.md has the design.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from rkllm_mqtt.bridge.acks import AckSequencer, Delivery
from rkllm_mqtt.bridge.outgoing import publish_problem
from rkllm_mqtt.bridge.publish_reader import Publish, complete_packet, decode_publish
from rkllm_mqtt.errors import quote_input
from rkllm_mqtt.mqtt_client import build_client
from rkllm_mqtt.settings import MqttSettings

log = structlog.get_logger(__name__)

SESSION_EXPIRY_S = 3600
CONNACK_TIMEOUT_S = 4.0
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 60
# Unacknowledged QoS 1 publishes on the wire. Mosquitto advertises a Receive Maximum of 20 in its CONNACK and
# MQTT 5 forbids sending more; paho does not read that value, so the bridge keeps to it.
MAX_INFLIGHT = 20
# Prompts received and not yet settled, announced to an MQTT 5 broker as the Receive Maximum (MQTT 3.1.1 brokers
# use their own window: Mosquitto's max_inflight_messages, 20 by default).
MAX_UNSETTLED = 20
# MQTT 5 user property on a prompt handed to a peer: a token that lets the peer recognise it when it comes again.
HANDOFF_PROPERTY = "rkllm-handoff"
# Packets read ahead are handed on in one pass of paho's loop, up to this many before pending writes go out.
READ_BATCH = 64
# ... and up to this many when nothing waits to be written (a 64 KiB read holds some 700 small prompts).
FAST_READ_LIMIT = 1024
# Queued packets are written together, up to this many bytes per send() (paho sends them one by one).
WRITE_BATCH_BYTES = 64 * 1024
# Reason codes that mean "this broker does not speak MQTT 5" (v5 0x84, and 3.1.1's 1 read back).
_PROTOCOL_REFUSED = {0x84, 1}


@dataclass(frozen=True, slots=True)  # slots: a flood holds tens of thousands in the inbox
class IncomingMessage:
    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)
    qos: int = 0
    # Set by the broker on a message it sends again (after a reconnect): it may have been received before.
    dup: bool = False
    # Present when the message waits for :meth:`MqttTransport.settle` before it is acknowledged.
    delivery: Delivery | None = None
    # A prompt a peer handed on (cluster mode, MQTT 5): the token that is the same each time it is sent.
    handoff: str | None = None


@dataclass(frozen=True)
class Subscription:
    topic: str
    qos: int = 1


# What one read from the broker's socket asks for: many small packets, or the start of a large one.
_READ_BYTES = 65536
# A buffer ending with fewer bytes than this (the start of a packet) is topped up by the next read; a larger rest
# is the start of a large packet, which paho reads on in large pieces (topping it up would copy it again and again).
_TOP_UP_BELOW = 4096


class _BufferedReads:
    """The broker's TCP socket, with recv() served from one large read.

    paho reads a packet with one recv() for its first byte, one for each byte of its length and one for the rest:
    three system calls for every small PUBLISH. Here one read takes whatever has arrived (up to 64 KiB) and the
    recv() calls after it are answered from it. The bytes kept here have already left the socket, so select()
    would not report them: paho's loop asks pending() first and reads them without waiting. Only an empty buffer
    reads from the socket, so its EAGAIN, end of stream and errors reach paho as before, after the packets that
    arrived ahead of them. Everything else is the socket's own.

    :meth:`fill` reads ahead for the PUBLISH reader (:meth:`_Client._take_publishes`). An end of stream or an
    error it meets is kept and given to paho's next recv() once the bytes before it are used.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0
        self.reads = 0  # from the socket
        self._ended = False  # the peer closed: every recv() after the buffered bytes returns b""
        self._error: OSError | None = None  # raised by the next recv() after the buffered bytes

    def fill(self) -> None:
        """Read what has arrived into the buffer when it is used up, or holds only the start of a small packet
        (which would otherwise go to paho to finish); nothing when nothing has arrived."""
        kept = len(self._buffer) - self._pos
        if kept >= _TOP_UP_BELOW or self._ended or self._error is not None:
            return
        self.reads += 1
        try:
            data = self._sock.recv(_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._error = exc
            return
        if not data:
            self._ended = True
        self._buffer, self._pos = (self._buffer[self._pos :] + data if kept else data), 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos == len(self._buffer):
            if self._ended:
                return b""
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self.reads += 1
            data = self._sock.recv(max(bufsize, _READ_BYTES))
            if len(data) <= bufsize:
                return data
            self._buffer, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._buffer))
        return self._buffer[start : self._pos]

    def pending(self) -> int:
        return len(self._buffer) - self._pos

    def buffered(self) -> tuple[bytes, int]:
        """The bytes read ahead and where the unread ones start (for :meth:`_Client._take_publishes`)."""
        return self._buffer, self._pos

    def consume(self, pos: int) -> None:
        """The bytes before ``pos`` were used without recv()."""
        self._pos = pos

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._buffer, self._pos = b"", 0
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeername, shutdown...
        return getattr(self._sock, name)


class _WakeState:
    """Whether a wake-up byte is on its way to paho's loop (written, not yet read)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = False


class _WakeWriter:
    """The end of paho's socket pair that publishers write to, sending one byte until the loop has read it.

    paho writes a byte for every packet it queues, so that a loop asleep in select() wakes up to send it: a system
    call per message, made while paho's message lock and the publish gate are held. The interpreter lock is let go
    during the call, so in a flood the other threads took it and the publisher then waited for it, holding those
    locks, while paho's own thread waited for them in turn. One byte on its way wakes the loop just as well: the
    loop reads the pair and then writes everything queued, including what was queued after the byte.
    """

    def __init__(self, sock: socket.socket, state: _WakeState) -> None:
        self._sock = sock
        self._state = state

    def send(self, data: bytes) -> int:
        if self._state.pending:
            return len(data)
        self._state.pending = True  # before the write: a publisher after it finds the byte already sent
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:  # close, fileno...
        return getattr(self._sock, name)


class _WakeReader:
    """The loop's end of the socket pair: reading it is when the next publisher must write a byte again."""

    def __init__(self, sock: socket.socket, state: _WakeState) -> None:
        self._sock = sock
        self._state = state

    def recv(self, bufsize: int) -> bytes:
        # Cleared after the read, and the loop writes what is queued only after that. A publisher that found a
        # byte pending had queued its packet before this point: it is written now. One that comes later sends a
        # byte of its own, which stays in the pair for the next select(). (Cleared before the read, the read could
        # take a byte sent after the clearing and leave the flag set with no byte on its way: the loop then slept
        # with packets queued.)
        try:
            return self._sock.recv(bufsize)
        finally:
            self._state.pending = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:  # close...
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client with a longer network-loop timeout.

    ``loop_start`` runs ``loop_forever`` with select() timing out every second: one wake-up per second in
    an idle daemon. Publishing wakes the loop through paho's socket pair anyway, so the timeout only paces the
    keepalive check; a quarter of the keepalive still sends every PINGREQ well within the broker's 1.5x grace.
    """

    loop_timeout_s = 1.0

    # Closes a race in paho's reconnect(): it installs the new socket and only then queues CONNECT, so a publish
    # from another thread in between went out ahead of CONNECT. Mosquitto closes such a connection (and paho tries
    # again); amqtt keeps it open and never answers, which left the bridge unconnected for good. Publishers take
    # this gate; reconnect() holds it from the socket's creation until CONNECT is queued (microseconds, never
    # during the TCP connect itself).
    publish_gate = threading.Lock()  # replaced per instance in __init__; a class default keeps mypy simple
    _gate_held = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.publish_gate = threading.Lock()
        self._gate_held = False

    # paho creates its socket pair in loop_start() (and loop()) and assigns both ends: each is wrapped as it is set.
    @property
    def _sockpairR(self) -> Any:  # noqa: N802 (paho's name)
        return self.__dict__.get("_wake_reader")

    @_sockpairR.setter
    def _sockpairR(self, sock: Any) -> None:  # noqa: N802
        self.__dict__["_wake_reader"] = None if sock is None else _WakeReader(sock, self._fresh_wake_state())

    @property
    def _sockpairW(self) -> Any:  # noqa: N802
        return self.__dict__.get("_wake_writer")

    @_sockpairW.setter
    def _sockpairW(self, sock: Any) -> None:  # noqa: N802
        self.__dict__["_wake_writer"] = None if sock is None else _WakeWriter(sock, self._fresh_wake_state())

    def _fresh_wake_state(self) -> _WakeState:
        """The state both ends share; a new pair has no byte in it yet."""
        state: _WakeState | None = self.__dict__.get("_wake")
        if state is None:
            state = self.__dict__["_wake"] = _WakeState()
        state.pending = False
        return state

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        finally:
            if self._gate_held:
                self._gate_held = False
                self.publish_gate.release()

    # Set by the transport: receives each PUBLISH read without paho (rkllm_mqtt.bridge.publish_reader).
    fast_publish: Callable[[Publish], None] | None = None

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # paho reads one packet per pass of its loop (or one per message in flight) and goes round select() again:
        # a system call, and with it a wait for the interpreter lock while the dispatcher runs, for each small
        # packet, even when the next ones are already read ahead. A pass now hands on what the buffer holds: up to
        # READ_BATCH packets before what waits to be sent (a publish from another thread, an acknowledgement) goes
        # out, FAST_READ_LIMIT when nothing waits, and at most two reads from the socket (a packet may be cut at the
        # end of a read), so under a steady flood paho's loop still comes round to send its PINGREQ and to stop.
        # Complete PUBLISH packets in the buffer are decoded here (_take_publishes); paho reads everything else.
        current = self._sock
        if not isinstance(current, _BufferedReads):
            return super().loop_read(max_packets)
        sock: _BufferedReads = current
        reads = sock.reads
        handled = 0
        if self.fast_publish is not None and self._in_packet["command"] == 0:
            sock.fill()  # so that the first packet of the read is not paho's to decode
            handled = self._take_publishes(sock, 0)
            if sock.pending() and sock.reads - reads < 2:
                sock.fill()  # the rest of a packet cut at the end of the read
                handled = self._take_publishes(sock, handled)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        # A closed socket (paho closes it on an error, and may replace it later) has nothing pending.
        while not handled or (sock.pending() and sock.reads - reads < 2 and handled < self._read_limit()):
            rc = super().loop_read(max_packets)
            handled += 1
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is not current:
                break
            handled = self._take_publishes(sock, handled)
        return rc

    def _read_limit(self) -> int:
        """Packets one pass of the loop hands on: fewer when something waits to be sent."""
        return READ_BATCH if self.want_write() else FAST_READ_LIMIT

    def _take_publishes(self, sock: _BufferedReads, handled: int) -> int:
        """Hand on the complete QoS 0 and 1 PUBLISH packets at the head of the buffer; ``handled`` plus their count.

        Only between packets (paho may hold the start of one), and a QoS 1 one only when paho would not
        acknowledge it itself (manual acknowledgement). Stops at the first packet that is anything else."""
        sink = self.fast_publish
        if sink is None or self._in_packet["command"] != 0:
            return handled
        limit = self._read_limit()
        qos1 = self._manual_ack
        v5 = self._protocol == mqtt.MQTTv5
        buffer, pos = sock.buffered()
        taken = 0
        while handled + taken < limit:
            packet = complete_packet(buffer, pos)
            if packet is None:
                break
            first, start, end = packet
            if first & 0x06 and not qos1:  # QoS 1 that paho acknowledges itself: its path, not this one
                break
            publish = decode_publish(first, buffer[start:end], v5=v5)  # None for anything but a plain PUBLISH
            if publish is None:
                break
            pos = end
            sock.consume(pos)
            taken += 1
            sink(publish)
        if taken:
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        return handled + taken

    def _create_socket(self) -> Any:
        sock = super()._create_socket()  # the TCP (and TLS) connect, outside the gate
        if type(sock) is socket.socket:  # not TLS (its own buffer and pending()), websockets or a SOCKS proxy
            sock = _BufferedReads(sock)
        self.publish_gate.acquire()
        self._gate_held = True
        return sock

    def _thread_main(self) -> None:  # paho's own, with the timeout passed on
        try:
            self.loop_forever(timeout=self.loop_timeout_s, retry_first_connection=True)
        finally:
            self._thread = None

    def _packet_write(self) -> MQTTErrorCode:
        """paho's writer, sending the queued packets together (up to ``WRITE_BATCH_BYTES`` per call).

        paho sends each packet with its own send(): a flood of answers cost a system call per message, and after
        each one a wait for the interpreter lock while other threads ran. paho also reports every QoS 0 PUBLISH
        written to ``on_publish``, building a reason code and properties for it; the transport settles QoS 0
        messages when it publishes them, so here they are only marked as published."""
        queue = self._out_packet
        while queue:
            batch = [queue.popleft()]
            size = batch[0]["to_process"]
            while queue and size < WRITE_BATCH_BYTES:
                batch.append(queue.popleft())
                size += batch[-1]["to_process"]
            data = b"".join(p["packet"][p["pos"] :] for p in batch)
            try:
                written = self._sock_send(data)
            except (AttributeError, ValueError):
                queue.extendleft(reversed(batch))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                queue.extendleft(reversed(batch))
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                queue.extendleft(reversed(batch))
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if written <= 0:
                queue.extendleft(reversed(batch))
                break
            for index, packet in enumerate(batch):
                step = min(written, packet["to_process"])
                packet["to_process"] -= step
                packet["pos"] += step
                written -= step
                if packet["to_process"] > 0:
                    queue.extendleft(reversed(batch[index:]))  # the rest goes first next time, in order
                    break
                if self._packet_sent(packet):  # a DISCONNECT: what came after it stays queued, as with paho
                    queue.extendleft(reversed(batch[index + 1 :]))
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_sent(self, packet: Any) -> bool:
        """A packet is fully written. True when it was a DISCONNECT: the connection is then closed."""
        command = packet["command"] & 0xF0
        if command == mqtt.PUBLISH and packet["qos"] == 0 and packet["info"] is not None:
            packet["info"]._set_as_published()
        if command != mqtt.DISCONNECT:
            return False
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_SUCCESS)
        self._sock_close()
        if self._state == _ConnectionState.MQTT_CS_DISCONNECTING:
            self._state = _ConnectionState.MQTT_CS_DISCONNECTED
        return True


class MqttTransport:
    """A connected paho client with the bridge's conventions. ``start()`` connects in the background."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        host: str,
        availability_topic: str | None,
        subscriptions: list[Subscription],
        on_message: Callable[[IncomingMessage], None],
        on_connected: Callable[[], None],
        force_protocol: str | None = None,
        manual_ack: bool = False,
        client_id_suffix: str = "",
    ) -> None:
        self.settings = settings
        self.host = host
        self.availability_topic = availability_topic
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_connected = on_connected
        self.protocol = force_protocol or settings.protocol
        self.manual_ack = manual_ack
        self.client_id = settings.resolved_client_id() + client_id_suffix
        self._acks = AckSequencer()
        # Callbacks run when the broker acknowledges a publish, by message id; PUBACKs that arrive while a publish
        # with a callback is being registered are remembered, so none is missed (see publish()).
        self._on_acked: dict[int, Callable[[], None]] = {}
        self._acked_early: set[int] = set()
        self._registering = 0
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._max_packet_bytes: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK), if any
        self._ever_connected = False
        self._socket_opened = False
        self._fallback_timer: threading.Timer | None = None
        self._stopping = False
        self._unacked = 0  # QoS 1 publishes paho holds until the broker acknowledges them (queued or in flight)
        self._unacked_lock = threading.Lock()
        self._last_properties: tuple[tuple[bytes | None, str | None], Properties] | None = None

    # -- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def expires_messages(self) -> bool:
        """Connected with MQTT 5, where a publish can carry a Message Expiry Interval."""
        return self.protocol == "5"

    @property
    def is_v5(self) -> bool:
        return self.protocol in ("5", "auto")

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._client = self._build_client()
            self._connect(self._client)
        if self.protocol == "auto":
            self._fallback_timer = threading.Timer(CONNACK_TIMEOUT_S, self._fallback_if_silent)
            self._fallback_timer.daemon = True
            self._fallback_timer.start()

    def stop(self, offline_payload: bytes = b"offline", timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained) and disconnect cleanly, which suppresses the Last Will."""
        self._stopping = True
        if self._fallback_timer is not None:
            self._fallback_timer.cancel()
        client = self._client
        if client is None:
            return
        if self.connected and self.availability_topic is not None:
            info = client.publish(self.availability_topic, offline_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("mqtt_offline_not_sent")
        client.disconnect()
        client.loop_stop()

    def _build_client(self) -> mqtt.Client:
        s = self.settings
        # Credentials and TLS exactly as ask and doctor use them (rkllm_mqtt.mqtt_client).
        client = build_client(
            s,
            client_id=self.client_id,
            protocol="5" if self.is_v5 else "3.1.1",
            persistent=True,
            client_class=_Client,
        )
        client.manual_ack_set(self.manual_ack)
        if self.availability_topic is not None:
            client.will_set(self.availability_topic, b"offline", qos=1, retain=True)
        client.loop_timeout_s = s.keepalive_s / 4
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # unbounded: nothing the bridge publishes is dropped while away
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.fast_publish = self._on_incoming
        client.on_socket_open = self._on_socket_open
        client.on_publish = self._on_publish
        return client

    def _connect(self, client: mqtt.Client) -> None:
        s = self.settings
        if self.is_v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            if self.manual_ack:
                # Unsettled prompts the broker may send before it waits for an acknowledgement: they are held here.
                props.ReceiveMaximum = MAX_UNSETTLED
            client.connect_async(self.host, s.port, s.keepalive_s, clean_start=False, properties=props)
        else:
            client.connect_async(self.host, s.port, s.keepalive_s)
        client.loop_start()

    def _fallback_if_silent(self) -> None:
        if not self._ever_connected and not self._stopping and self.protocol == "auto":
            log.warning("mqtt_v5_unanswered", fallback="3.1.1", waited_s=CONNACK_TIMEOUT_S)
            self._switch_to_311()

    def _switch_to_311(self) -> None:
        with self._lock:
            if self.protocol == "3.1.1" or self._stopping:
                return
            old = self._client
            self.protocol = "3.1.1"
            if old is not None:
                old.disconnect()
                old.loop_stop()
            self._client = self._build_client()
            self._connect(self._client)

    # -- paho callbacks (network thread): hand work on only ---------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._socket_opened = True
        # paho leaves Nagle on: small stream publishes would wait for ACKs of earlier ones.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if self.protocol == "auto" and not self._ever_connected and reason_code.value in _PROTOCOL_REFUSED:
                log.warning("mqtt_v5_refused", fallback="3.1.1", reason=str(reason_code))
                threading.Thread(target=self._switch_to_311, name="mqtt-fallback", daemon=True).start()
                return
            log.error(
                "mqtt_connect_refused",
                client_id=self.client_id,
                host=self.host,
                port=self.settings.port,
                reason=str(reason_code),
                hint="check mqtt.username / mqtt.password; retrying with backoff",
            )
            return
        first = not self._ever_connected
        self._max_packet_bytes = getattr(properties, "MaximumPacketSize", None)
        self._ever_connected = True
        if self.protocol == "auto":
            self.protocol = "5"
        self._connected.set()
        if self.manual_ack:
            # Whatever was not acknowledged on the old connection comes again (DUP set) on this one.
            unsettled = self._acks.new_connection()
            if unsettled:
                log.info("mqtt_unsettled_redelivered", messages=unsettled)
        log.info(
            "mqtt_connected",
            host=self.host,
            port=self.settings.port,
            protocol=self.protocol,
            session_present=bool(getattr(flags, "session_present", False)),
            first=first,
            client_id=self.client_id,
        )
        if self.availability_topic is not None:
            client.publish(self.availability_topic, b"online", qos=1, retain=True)
        if self.subscriptions:
            client.subscribe([(sub.topic, sub.qos) for sub in self.subscriptions])
        self.on_connected()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self.protocol == "auto" and not self._ever_connected and self._socket_opened and not self._stopping:
            # The broker closed the connection before answering an MQTT 5 CONNECT: it does not speak 5.
            log.warning("mqtt_v5_closed", fallback="3.1.1", reason=str(reason_code))
            threading.Thread(target=self._switch_to_311, name="mqtt-fallback", daemon=True).start()
            return
        if not self._stopping and was_connected:
            log.warning("mqtt_disconnected", reason=str(reason_code), will_reconnect=True)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        with self._unacked_lock:
            self._unacked = max(0, self._unacked - 1)
            callback = self._on_acked.pop(mid, None)
            if callback is None and self._registering:
                self._acked_early.add(mid)
        _ack_at_once(client.socket())
        if callback is not None:
            callback()

    @property
    def backlog(self) -> int:
        """QoS 1 messages not yet acknowledged by the broker: paho's queue, which nothing else bounds."""
        return self._unacked

    @property
    def unsent(self) -> int:
        """Packets built and not yet written to the socket, QoS 0 ones included (``backlog`` counts QoS 1 only)."""
        client = self._client
        return len(client._out_packet) if client is not None else 0

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """A PUBLISH paho read itself (the fast path left it to paho): handed on like the others."""
        props = getattr(message, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self._on_incoming(
            Publish(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                dup=bool(message.dup),
                mid=message.mid,
                response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
                correlation_data=bytes(correlation) if correlation is not None else None,
                user_properties=tuple(getattr(props, "UserProperty", None) or ()),
            )
        )

    def _on_incoming(self, publish: Publish) -> None:
        """Every incoming PUBLISH, read by the fast path or by paho, on paho's thread."""
        delivery = self._acks.arrived(publish.mid) if self.manual_ack and publish.qos > 0 else None
        handoff = None
        for key, value in publish.user_properties:
            if key == HANDOFF_PROPERTY:
                handoff = value
        try:
            self.on_message(
                IncomingMessage(
                    topic=publish.topic,
                    payload=publish.payload,
                    retain=publish.retain,
                    response_topic=publish.response_topic,
                    correlation_data=publish.correlation_data,
                    qos=publish.qos,
                    dup=publish.dup,
                    delivery=delivery,
                    handoff=handoff,
                )
            )
        except Exception:
            # Raised into paho, it would end the network loop; left unsettled, the message would hold back the
            # acknowledgement of every later one.
            log.exception("mqtt_message_handler_failed", topic=quote_input(publish.topic, 200))
            self.settle(delivery)

    def settle(self, delivery: Delivery | None) -> None:
        """The receiver is done with a message: acknowledge it (and any settled ones held behind it). Any thread."""
        if delivery is None:
            return
        client = self._client
        if client is None:
            return
        self._acks.settle(delivery, lambda mid: client.ack(mid, 1))

    # -- publishing (thread-safe: paho locks internally) ------------------------------------------------

    def _properties(self, correlation_data: bytes | None, response_topic: str | None) -> Properties:
        """The PUBLISH properties for these values, built once for all the messages of one request.

        Building paho's Properties costs ~20 us; every chunk of a stream carries the same correlation data. The
        one cached entry is replaced as a whole (one assignment), so concurrent publishers need no lock; paho
        only reads the object."""
        key = (correlation_data, response_topic)
        cached = self._last_properties
        if cached is not None and cached[0] == key:
            return cached[1]
        properties = Properties(PacketTypes.PUBLISH)
        if correlation_data is not None:
            properties.CorrelationData = correlation_data
        if response_topic is not None:
            properties.ResponseTopic = response_topic
        self._last_properties = (key, properties)
        return properties

    @staticmethod
    def _expiring_properties(correlation_data: bytes | None, response_topic: str | None, expiry_s: int) -> Properties:
        """Properties of a message the broker drops after ``expiry_s`` (one per final response: not cached)."""
        properties = Properties(PacketTypes.PUBLISH)
        if correlation_data is not None:
            properties.CorrelationData = correlation_data
        if response_topic is not None:
            properties.ResponseTopic = response_topic
        properties.MessageExpiryInterval = expiry_s
        return properties

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        on_acked: Callable[[], None] | None = None,
        handoff: str | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish; ``on_acked`` runs once the broker has the message (its PUBACK; at once for QoS 0), on paho's
        thread or this one."""
        client = self._client
        if client is None:
            log.error("mqtt_publish_before_start", topic=topic)
            return None
        # The last gate: a message the broker refuses as malformed would stay in paho's session and close the
        # connection again after every reconnect. It is dropped here instead, and the caller sees None.
        problem = publish_problem(
            topic,
            payload,
            qos=qos,
            v5=self.protocol == "5",
            correlation_data=correlation_data,
            response_topic=response_topic,
            max_packet_bytes=self._max_packet_bytes,
            expires=bool(expiry_s),
        )
        if problem is not None:
            log.error("mqtt_publish_refused", topic=quote_input(topic, 200), reason=problem)
            return None
        properties = None
        if self.protocol == "5" and expiry_s:
            properties = self._expiring_properties(correlation_data, response_topic, expiry_s)
        elif (correlation_data is not None or response_topic is not None) and self.protocol == "5":
            properties = self._properties(correlation_data, response_topic)
        if handoff is not None and self.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # not cached: one hand-off, one token
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            properties.UserProperty = (HANDOFF_PROPERTY, handoff)
        tracked = on_acked is not None and qos > 0
        if tracked:
            with self._unacked_lock:
                self._registering += 1
        gate = client.publish_gate if isinstance(client, _Client) else contextlib.nullcontext()
        try:
            with gate:
                info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except BaseException:
            if tracked:
                with self._unacked_lock:
                    self._registering -= 1
            raise
        queued = qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
        run_now = on_acked is not None and not queued  # QoS 0, or refused: nothing to wait for
        with self._unacked_lock:
            if queued:
                self._unacked += 1
            if tracked:
                self._registering -= 1
                if queued and info.mid in self._acked_early:
                    run_now = True  # the PUBACK came before the callback was registered
                    self._acked_early.discard(info.mid)
                elif queued and on_acked is not None:
                    self._on_acked[info.mid] = on_acked
                if not self._registering:
                    self._acked_early.clear()
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("mqtt_publish_failed", topic=topic, rc=info.rc)
        if run_now and on_acked is not None:
            on_acked()
        return info


def _ack_at_once(sock: Any) -> None:
    """Acknowledge the broker's last TCP segment (a PUBACK) now instead of up to 40 ms later.

    Mosquitto keeps Nagle's algorithm on by default (``set_tcp_nodelay false``): while a small segment it sent
    is unacknowledged, it holds back the next one. The kernel delays the ACK of a PUBACK (nothing is sent back
    to carry it), so a request arriving right after the bridge published a final response waited for that
    delayed ACK: 40-48 ms to its first chunk instead of 3-6 ms (docs/performance.md). Linux only.
    """
    if sock is None or not hasattr(socket, "TCP_QUICKACK"):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
