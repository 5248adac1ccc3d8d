"""The embedded MQTT broker (amqtt), for running with zero configuration.

It runs in its own thread with its own asyncio loop so the rest of the daemon stays synchronous.
amqtt speaks MQTT 3.1.1 only; the transport knows to connect to it with 3.1.1 straight away.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
from typing import Any

import structlog

log = structlog.get_logger(__name__)


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
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise BrokerStartError(f"embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            raise BrokerStartError(f"embedded broker failed to start: {self._error}") from self._error
        log.info("embedded_broker_started", host=self.host, port=self.port)

    def _run(self) -> None:
        from amqtt.broker import Broker  # imported here: only the embedded mode pays for it

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

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
