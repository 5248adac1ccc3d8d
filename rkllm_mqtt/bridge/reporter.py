"""What the scheduler tells one MQTT request, published on that request's reply topics (docs/topics.md).

One :class:`MqttJobReporter` per request: it knows the request's reply topics and correlation data, owns its
stream (:class:`~rkllm_mqtt.bridge.streaming.ChunkStreamer`) and builds its final response; publishing the final
(with ``last``, the error event and the extensions' share) is the door's, through :class:`FinalSink`.
"""

from __future__ import annotations

from typing import Protocol

from rkllm_mqtt.bridge.publisher import Publisher
from rkllm_mqtt.bridge.requests import Request
from rkllm_mqtt.bridge.streaming import ChunkStreamer
from rkllm_mqtt.core.jobs import GenerationResult, Job
from rkllm_mqtt.core.scheduler import tokens_per_s
from rkllm_mqtt.errors import ErrorCode
from rkllm_mqtt.payloads import ErrorInfo, FinalResponse, FinalState, RequestStatus, Timing, Usage


class FinalSink(Protocol):
    """Where a finished request's final response goes (the MQTT door)."""

    node: str

    def model_name(self) -> str | None: ...

    def publish_final(self, final: FinalResponse, reply_topic: str | None, correlation: bytes | None) -> None: ...


def final_state(code: ErrorCode | None) -> FinalState:
    if code is None:
        return "done"
    if code == "aborted":
        return "aborted"
    if code == "timeout":
        return "timeout"
    return "error"


class MqttJobReporter:
    """The scheduler's reporter for one MQTT request. Called on the scheduler's threads; never blocks."""

    def __init__(self, request: Request, publisher: Publisher, finals: FinalSink, *, interval_ms: int) -> None:
        self.request = request
        self.publisher = publisher
        self.finals = finals
        self.reply = publisher.reply_topics(request.id, request.reply_topic)
        self.stream = ChunkStreamer(
            request.id,
            publisher.chunk_sender(self.reply, request.correlation_data),
            interval_ms=interval_ms,
            enabled=request.stream,
            congested=publisher.congested,
        )

    def queued(self, job: Job, position: int) -> None:
        status = RequestStatus(id=job.id, status="queued", position=position)
        self.publisher.status(self.reply, status, self.request.correlation_data)

    def started(self, job: Job) -> None:
        status = RequestStatus(id=job.id, status="started", position=0)
        self.publisher.status(self.reply, status, self.request.correlation_data)

    def text(self, job: Job, chunk: str) -> None:
        self.stream.text(chunk)

    def flush_deadline(self, job: Job) -> float | None:
        return self.stream.flush_deadline()

    def flush(self, job: Job) -> None:
        self.stream.flush()

    def finished(self, job: Job, result: GenerationResult, queued_ms: float, total_ms: float) -> None:
        self.stream.flush()  # whatever is held goes out before the final
        code = result.error_code
        final = FinalResponse(
            id=job.id,
            state=final_state(code),
            text=result.text,
            finish_reason=result.finish_reason,
            error=ErrorInfo(code=code, message=result.error_message or code) if code else None,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            timing=Timing(
                queued_ms=queued_ms,
                ttft_ms=round(result.ttft_ms, 2) if result.ttft_ms is not None else None,
                generate_ms=round(result.generate_ms, 2),
                total_ms=total_ms,
                tokens_per_s=tokens_per_s(result),
            ),
            node=self.finals.node,
            model=self.finals.model_name(),
            session=self.request.session,
        )
        self.finals.publish_final(final, self.request.reply_topic, self.request.correlation_data)
