"""The scheduler's reports of one HTTP job, handed from the scheduler's threads to the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from rkllm_mqtt.core.jobs import GenerationResult, Job


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Text:
    chunk: str


@dataclass(frozen=True)
class Finished:
    result: GenerationResult
    queued_ms: float
    total_ms: float


Report = Started | Text | Finished


class LoopReporter:
    """A JobReporter that only posts each report to an asyncio queue on the server's loop (never blocks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reports: asyncio.Queue[Report] = asyncio.Queue()

    def _post(self, report: Report) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is closed: nobody is left to tell
            self.loop.call_soon_threadsafe(self.reports.put_nowait, report)

    def queued(self, job: Job, position: int) -> None:
        pass  # the HTTP answer starts with the first text; a queued request simply waits

    def started(self, job: Job) -> None:
        self._post(Started())

    def text(self, job: Job, chunk: str) -> None:
        self._post(Text(chunk))

    def finished(self, job: Job, result: GenerationResult, queued_ms: float, total_ms: float) -> None:
        self._post(Finished(result, queued_ms, total_ms))
