"""The embedded MQTT broker (amqtt), for running with zero configuration.

It runs in its own thread with its own asyncio loop so the rest of the daemon stays synchronous.
amqtt speaks MQTT 3.1.1 only; the transport knows to connect to it with 3.1.1 straight away.

amqtt is corrected in two places (see :func:`_mosquitto_like_broker`) so that every example written for
Mosquitto works on it too. The corrections reach into amqtt's private methods, so they are tested with the
amqtt versions in ``TESTED_AMQTT_VERSIONS`` only (``pyproject.toml`` pins the same), and a warning is logged
when another version is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import socket
import threading
from importlib import metadata
from typing import Any

import structlog

from rkllm_mqtt import __version__

log = structlog.get_logger(__name__)

# Set while amqtt handles a SUBSCRIBE packet: the only time retained messages are due (see below).
_SUBSCRIBING: contextvars.ContextVar[bool] = contextvars.ContextVar("rkllm_mqtt_subscribing", default=False)

# The broker says what it is on this retained topic, as Mosquitto does ("mosquitto version 2.0.18"); doctor
# reads it to recognise the embedded broker of a daemon that is already running.
SYS_VERSION_TOPIC = "$SYS/broker/version"
EMBEDDED_IDENTITY = "rkllm-mqtt embedded broker"

# The amqtt releases the corrections below were written for and tested with.
TESTED_AMQTT_VERSIONS = ("0.12.1",)


# How amqtt reports a connection closed before its CONNECT: an error, then a warning, for the one event.
_CLOSED_BEFORE_CONNECT = ("No data from ", "Failed to initialize client session: No data to decode")


class _ClosedBeforeConnect(logging.Filter):
    """amqtt logs a connection closed before its CONNECT at error level (and again as a warning). That is what
    every port check does: ``rkllm-mqtt ask`` and ``doctor`` look at the port before they connect, and so do
    monitoring tools. Each one put an error in the daemon's log; Mosquitto reports the same as a notice. Logged at
    debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not str(record.msg).startswith(_CLOSED_BEFORE_CONNECT):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _quiet_closed_before_connect() -> None:
    logger = logging.getLogger("amqtt.broker")
    if not any(isinstance(existing, _ClosedBeforeConnect) for existing in logger.filters):
        logger.addFilter(_ClosedBeforeConnect())


class BrokerStartError(Exception):
    """The embedded broker could not start (most often: the port is taken)."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class EmbeddedBroker:
    """amqtt on ``host:port`` in a background thread. ``start()`` returns once it listens."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 10.0) -> None:
        if not port_is_free(self.host, self.port):
            raise BrokerStartError(
                f"port {self.port} on {self.host} is already in use: another MQTT broker is probably running "
                f"there; set mqtt.host to use it, or stop it"
            )
        _quiet_closed_before_connect()
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise BrokerStartError(f"embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            raise BrokerStartError(f"embedded broker failed to start: {self._error}") from self._error
        log.info("embedded_broker_started", host=self.host, port=self.port)

    def _run(self) -> None:
        broker_class = _mosquitto_like_broker()  # amqtt imported here: only the embedded mode pays for it

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = broker_class(self._config(), loop=loop)
            await self._broker.start()
            identity = f"{EMBEDDED_IDENTITY} {__version__} (amqtt {amqtt_version()})"
            await self._broker.retain_message(None, SYS_VERSION_TOPIC, identity.encode(), 0)

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # reported to start(), which raises it in the caller's thread
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        loop.run_forever()
        loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        log.info("embedded_broker_stopped", host=self.host, port=self.port)


def amqtt_version() -> str | None:
    try:
        return metadata.version("amqtt")
    except metadata.PackageNotFoundError:
        return None


def _end_stream_on_reset(reader: asyncio.StreamReader) -> None:
    """Make a reset connection end the stream after the bytes already received, instead of discarding them.

    A device that sends CONNECT, PUBLISH and DISCONNECT and closes at once answers amqtt's CONNACK with a reset.
    asyncio then stores the error in the reader, and the next read raises it even though the PUBLISH is still
    buffered: the message was lost whenever the reset was seen before amqtt's reader loop reached it (one
    connection in seven here, most of them on a slower machine). Mosquitto handles what it has read first.
    """
    store_error = reader.set_exception

    def end_or_store(exc: Exception) -> None:
        if isinstance(exc, ConnectionResetError):
            reader.feed_eof()
        else:
            store_error(exc)

    reader.set_exception = end_or_store  # type: ignore[method-assign]


def _mosquitto_like_broker() -> type[Any]:
    """amqtt's ``Broker``, corrected where it behaves differently from Mosquitto (and from MQTT 3.1.1).

    1. **A PUBLISH that arrives together with the DISCONNECT is dropped.** amqtt's reader hands each packet to a
       new task and reads on; with PUBLISH, DISCONNECT and the end of the stream already buffered it reads all
       three without yielding, then cancels the tasks still pending, the PUBLISH's among them, before it ran.
       A client that sends CONNECT, a QoS 0 PUBLISH and DISCONNECT in one go (small devices do) lost every
       message. Corrected by yielding once per read (:class:`_YieldingReader`) and by ending the stream, not
       failing it, when such a client's kernel resets the connection (:func:`_end_stream_on_reset`).
    2. **A connecting client is sent the retained messages of every subscription on the broker**, not only its
       own: after CONNECT amqtt replays retained messages for every filter in its subscription table, whoever
       holds it. MQTT sends retained messages when a subscription is made, and Mosquitto does only that, also
       for a resumed session (whose client subscribes again if it wants them). Corrected the same way: retained
       messages go out only from the handling of a SUBSCRIBE (``_handle_subscription``). The replay also wrote
       to clients that had already sent DISCONNECT and closed, which reset the connection and lost what they
       had published.
    """
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker

    version = amqtt_version()
    if version not in TESTED_AMQTT_VERSIONS:
        log.warning(
            "embedded_broker_untested_amqtt",
            amqtt=version,
            tested=list(TESTED_AMQTT_VERSIONS),
            hint="the embedded broker's corrections were tested with other amqtt versions",
        )

    class _YieldingReader(StreamReaderAdapter):  # type: ignore[misc]
        async def read(self, n: int = -1) -> bytes:
            # With the bytes already buffered, amqtt's reader loop could read PUBLISH, DISCONNECT and the end of
            # the stream without ever yielding, then cancel the PUBLISH's task before it started. One yield per
            # read lets every task created for an earlier packet run first.
            await asyncio.sleep(0)
            data: bytes = await super().read(n)
            return data

    class MosquittoLikeBroker(Broker):  # type: ignore[misc]
        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            _end_stream_on_reset(reader)
            await self._client_connected(listener_name, _YieldingReader(reader), StreamWriterAdapter(writer))

        async def _handle_subscription(self, client_session: Any, handler: Any, subscribe_waiter: Any) -> None:
            token = _SUBSCRIBING.set(True)
            try:
                await super()._handle_subscription(client_session, handler, subscribe_waiter)
            finally:
                _SUBSCRIBING.reset(token)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            # Retained messages go out for a subscription the client is making now, never on connect.
            if _SUBSCRIBING.get():
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return MosquittoLikeBroker
