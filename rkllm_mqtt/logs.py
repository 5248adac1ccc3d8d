"""Logging, configured once at the entry point.

A terminal gets structlog's console renderer; anything else (journald, a pipe, a file) gets one JSON
object per line. Standard-library loggers (paho, amqtt) go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["console", "json"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Events logged once per message from the network: a flood of bad or refused prompts would write one line each
# (journald drops lines past its own rate limit anyway, and formatting them cost more than answering the
# prompts). Past LINES_PER_WINDOW of one event in WINDOW_S, the rest are counted and reported in one line.
FLOOD_PRONE_EVENTS = frozenset(
    {
        "request_refused",
        "request_error",
        "request_unparsable",
        "request_redelivered",
        "mqtt_publish_refused",
        "abort_ignored",
    }
)
WINDOW_S = 10.0
LINES_PER_WINDOW = 20
DROPPED_EVENT = "log_lines_dropped"


class RepeatLimiter:
    """A structlog processor: at most ``per_window`` lines of each flood-prone event per ``window_s``.

    The lines past the limit are dropped before anything is formatted; how many were dropped is logged as
    ``log_lines_dropped`` (event, count, window_s) when the window ends and another line of the kind comes, or
    when :meth:`report` is called (the daemon calls it on its status tick). Thread-safe."""

    def __init__(
        self,
        events: frozenset[str] = FLOOD_PRONE_EVENTS,
        *,
        window_s: float = WINDOW_S,
        per_window: int = LINES_PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.window_s = window_s
        self.per_window = per_window
        self.clock = clock
        self._lock = threading.Lock()
        self._window_ends = 0.0
        self._lines: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        if event not in self.events:
            return event_dict
        with self._lock:
            ended = self._roll_window()
            count = self._lines.get(event, 0)
            allowed = count < self.per_window
            if allowed:
                self._lines[event] = count + 1
            else:
                self._dropped[event] = self._dropped.get(event, 0) + 1
        self._log_dropped(ended)
        if not allowed:
            raise structlog.DropEvent
        return event_dict

    def report(self) -> None:
        """Log what was dropped in a window that has ended."""
        with self._lock:
            ended = self._roll_window()
        self._log_dropped(ended)

    def _roll_window(self) -> dict[str, int]:
        now = self.clock()
        if now < self._window_ends:
            return {}
        ended, self._dropped = self._dropped, {}
        self._lines = {}
        self._window_ends = now + self.window_s
        return ended

    def _log_dropped(self, dropped: dict[str, int]) -> None:
        for event, count in dropped.items():
            structlog.get_logger(__name__).warning(
                DROPPED_EVENT, dropped_event=event, count=count, window_s=self.window_s
            )


_limiter: RepeatLimiter | None = None


def report_dropped_lines() -> None:
    """Log the count of lines the configured limiter dropped in a window that has ended."""
    if _limiter is not None:
        _limiter.report()


def choose_format(configured: LogFormat | None) -> LogFormat:
    if configured is not None:
        return configured
    return "console" if sys.stderr.isatty() else "json"


def configure_logging(level: str = "info", fmt: LogFormat | None = None) -> None:
    global _limiter  # noqa: PLW0603 -- one logging setup per process, made at its entry point
    _limiter = RepeatLimiter()
    numeric = _LEVELS.get(level, logging.INFO)
    renderer: structlog.typing.Processor
    if choose_format(fmt) == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        # The limiter first: a dropped line costs nothing further.
        processors=[_limiter, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # amqtt logs every packet at info; only its warnings matter to an operator.
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
