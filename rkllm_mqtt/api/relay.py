"""One generation over HTTP: the job submitted to the scheduler, its reports relayed to the client.

The scheduler's reports arrive on the server's loop (:mod:`rkllm_mqtt.api.reporter`). Text goes out as it comes
(one NDJSON line per piece) unless the answer must be checked whole (``format``); thinking and tool calls are
taken out of the text on the way. The HTTP status is chosen as late as possible: a request that fails before any
text gets a proper error status; one that fails later gets Ollama's error line in the stream. A handler that
ends without the job's final report (its client went away) cancels the job, queued or running.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web

from rkllm_mqtt.api.answers import STATUS_FOR_CODE, Answer, ChatAnswer
from rkllm_mqtt.api.conversation import Conversations, Plan
from rkllm_mqtt.api.formats import AnswerFormat, FormatError
from rkllm_mqtt.api.reply import ReplySplitter
from rkllm_mqtt.api.reporter import Finished, LoopReporter, Text
from rkllm_mqtt.core.jobs import Admission, GenerationRequest, Job, Refused
from rkllm_mqtt.errors import ErrorCode

log = structlog.get_logger(__name__)

NDJSON = "application/x-ndjson"


class JobDesk(Protocol):
    """What the API needs of the scheduler."""

    def submit(self, job: Job) -> Admission: ...

    def abort(self, job_id: str | None = None) -> str: ...

    def record_rejection(self, code: ErrorCode) -> None: ...


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def ndjson_line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Turn:
    """How one generation is answered."""

    answer: Answer
    stream: bool
    fmt: AnswerFormat | None
    plan: Plan | None  # a chat turn: the conversation it belongs to
    tools: str | None


class JobRelay:
    def __init__(self, desk: JobDesk, conversations: Conversations) -> None:
        self.desk = desk
        self.conversations = conversations

    async def serve(self, request: web.Request, generation: GenerationRequest, turn: Turn) -> web.StreamResponse:
        answer, stream, fmt, plan, tools = turn.answer, turn.stream, turn.fmt, turn.plan, turn.tools
        reporter = LoopReporter(asyncio.get_running_loop())
        job = Job(f"http-{uuid.uuid4().hex[:16]}", generation, reporter, time.monotonic(), source="http")
        admission = self.desk.submit(job)
        if isinstance(admission, Refused):
            log.info("api_request_refused", request_id=job.id, code=admission.code, error=admission.message)
            return error_response(STATUS_FOR_CODE.get(admission.code, 500), admission.message)
        log.info(
            "api_request",
            request_id=job.id,
            path=request.path,
            stream=stream,
            position=admission.position,
            session=plan.session if plan else None,
            reused=plan.reused if plan else None,
            role=generation.role,
            prompt_bytes=len(generation.prompt.encode("utf-8")),
        )
        splitter = ReplySplitter(parse_tools=isinstance(answer, ChatAnswer) and tools is not None)
        live = stream and fmt is None  # a formatted answer is checked whole before any of it goes out
        response: web.StreamResponse | None = None
        finished: Finished | None = None
        try:
            while finished is None:
                report = await reporter.reports.get()
                if isinstance(report, Text):
                    pieces = splitter.feed(report.chunk)
                    if live and answer.has_output(pieces):
                        response = await self._send(request, response, answer.piece(pieces))
                elif isinstance(report, Finished):
                    finished = report
            tail = splitter.finish()
            result = finished.result
            if result.error_code is not None:
                if plan is not None:
                    self.conversations.settle(plan, tools, None)
                message = result.error_message or result.error_code
                log.info("api_request_failed", request_id=job.id, code=result.error_code, error=message)
                if response is not None:  # the status line is gone: Ollama's clients read an error line
                    await response.write(ndjson_line({"error": message}))
                    await response.write_eof()
                    return response
                return error_response(STATUS_FOR_CODE.get(result.error_code, 500), message)
            text = splitter.text
            if fmt is not None:
                try:
                    text = fmt.check(text)
                except FormatError as exc:
                    if plan is not None:
                        self.conversations.settle(plan, tools, None)
                    log.info("api_format_invalid", request_id=job.id, error=str(exc))
                    return error_response(500, str(exc))
            if plan is not None:
                self.conversations.settle(plan, tools, (text, splitter.calls))
            if not stream:
                whole = answer.whole(text, splitter.thinking, splitter.calls, result, finished.total_ms)
                return web.json_response(whole)
            if fmt is not None:
                tail.text, tail.thinking = text, splitter.thinking
            if answer.has_output(tail):
                response = await self._send(request, response, answer.piece(tail))
            response = await self._send(request, response, answer.last(result, finished.total_ms))
            await response.write_eof()
            return response
        finally:
            if finished is None:  # the client went away (or the server stops): the NPU is not kept for nobody
                job.cancel.cancel("disconnect")
                outcome = self.desk.abort(job.id)
                if plan is not None:
                    self.conversations.settle(plan, tools, None)
                log.info("api_client_gone", request_id=job.id, was=outcome)

    @staticmethod
    async def _send(
        request: web.Request, response: web.StreamResponse | None, data: dict[str, Any]
    ) -> web.StreamResponse:
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
        await response.write(ndjson_line(data))
        return response
