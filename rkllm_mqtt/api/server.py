"""The HTTP server of the Ollama-compatible API: aiohttp on an event loop of its own thread.

The daemon is built of threads; the API lives on one of them with its own asyncio loop, so nothing of the
daemon waits for HTTP and the handlers never wait for the daemon (they only submit jobs and read reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import structlog
from aiohttp import web

from rkllm_mqtt.api.relay import JobDesk
from rkllm_mqtt.api.routes import OllamaApi
from rkllm_mqtt.core.runtime_view import RuntimeStatusView
from rkllm_mqtt.settings import Settings

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 15.0
# On stop, how long open connections may take to finish (the scheduler has answered their jobs by then).
SHUTDOWN_TIMEOUT_S = 3.0


class ApiStartError(RuntimeError):
    """The API cannot listen (the port is taken, the address does not exist here)."""


class ApiServer:
    def __init__(self, settings: Settings, desk: JobDesk, runtime: RuntimeStatusView) -> None:
        self.settings = settings
        self.desk = desk
        self.runtime = runtime
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stop: asyncio.Event | None = None
        self._opened = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.settings.api.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.settings.api.port}"

    def start(self) -> None:
        """Listen, or raise ApiStartError saying why not."""
        api = self.settings.api
        if not api.loopback_only:
            log.warning(
                "api_exposed",
                host=api.host,
                port=api.port,
                token=api.token is not None,
                hint="the Ollama API is reachable from the network: anyone who reaches it can use the NPU"
                + ("" if api.token is not None else "; set api.token or bind api.host to 127.0.0.1"),
            )
        self._thread = threading.Thread(target=self._serve, name="http-api", daemon=True)
        self._thread.start()
        if not self._opened.wait(START_TIMEOUT_S):
            raise ApiStartError(f"the API on {api.host}:{api.port} did not start within {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise ApiStartError(f"cannot listen on {api.host}:{api.port}: {self._error}")
        log.info("api_listening", url=self.url, token=api.token is not None)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._open())
            except (OSError, RuntimeError) as exc:
                self._error = exc
                return
            finally:
                self._opened.set()
            assert self._stop is not None
            loop.run_until_complete(self._stop.wait())
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
        finally:
            loop.close()

    async def _open(self) -> None:
        self._stop = asyncio.Event()
        app = OllamaApi(self.settings, self.desk, self.runtime).app()
        # handler_cancellation: a client that goes away cancels its handler, which cancels its job.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.settings.api.host, self.settings.api.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise

    def stop(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or thread is None:
            return
        if stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended already
                loop.call_soon_threadsafe(stop.set)
        thread.join(SHUTDOWN_TIMEOUT_S + 5.0)
        log.info("api_stopped")
