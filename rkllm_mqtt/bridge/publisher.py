"""Everything the bridge publishes, each payload on its topic with its QoS and retain flag (docs/topics.md)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from rkllm_mqtt.bridge.publishing import Publishing
from rkllm_mqtt.bridge.retained_finals import RetainedFinals
from rkllm_mqtt.payloads import (
    ErrorEvent,
    ErrorInfo,
    FinalResponse,
    HealthPayload,
    ModelInfo,
    RequestStatus,
    StatePayload,
)
from rkllm_mqtt.topics import ReplyTopics, Topics

log = structlog.get_logger(__name__)

# Chunks merge instead of queueing once this many QoS 1 messages wait for the broker's acknowledgement. paho's
# queue is otherwise unbounded, and past 65,535 messages it runs out of MQTT message ids and refuses publishes:
# chunks and even the final response would be lost.
MAX_BACKLOG = 1000


class Publisher:
    # QoS 1 throughout: paho keeps QoS 1 messages while disconnected and sends them after the
    # reconnect, so no chunk, status or final response is lost to a broker restart.
    def __init__(self, transport: Publishing, topics: Topics, finals: RetainedFinals | None = None) -> None:
        self.transport = transport
        self.topics = topics
        self.finals = finals

    def congested(self) -> bool:
        """The broker is behind by MAX_BACKLOG messages: a stream should merge its text rather than queue more."""
        return self.transport.backlog >= MAX_BACKLOG

    def reply_topics(self, request_id: str, reply_topic: str | None) -> ReplyTopics:
        return ReplyTopics(reply_topic or self.topics.response(request_id))

    def chunk_sender(self, reply: ReplyTopics, correlation: bytes | None) -> Callable[[bytes], None]:
        """Publishes one request's stream chunks (ready JSON): the topic and properties are bound once."""
        publish = self.transport.publish
        topic = reply.stream

        def send(payload: bytes) -> None:
            publish(topic, payload, qos=1, correlation_data=correlation)

        return send

    def status(self, reply: ReplyTopics, status: RequestStatus, correlation: bytes | None) -> None:
        self.transport.publish(reply.status, status.to_json(), qos=1, correlation_data=correlation)

    def final(
        self,
        reply: ReplyTopics,
        response: FinalResponse,
        correlation: bytes | None,
        *,
        qos: int = 1,
        on_acked: Callable[[], None] | None = None,
        payload: bytes | None = None,
        retained: bool = True,
    ) -> None:
        """``on_acked`` runs once the broker has the final (the request is then settled); ``payload`` is the final
        already serialized (the bytes that were recorded before publishing); ``retained``: kept retained a while
        for a late subscriber (QoS 1 only)."""
        data = payload if payload is not None else response.to_json()
        if self._send_final(reply.final, data, correlation, qos, on_acked, retained=retained) is not None:
            return
        # The transport refused it (and logged why): a final the broker would not take. The request is still
        # answered, on its default topic, and without its text when the text is what made it too large.
        default = self.topics.response(response.id)
        if (
            default != reply.final
            and self._send_final(default, data, None, qos, on_acked, retained=retained) is not None
        ):
            return
        stripped = response.model_copy(
            update={
                "state": "error",
                "text": "",
                "finish_reason": "error",
                "error": ErrorInfo(
                    code="response_too_large",
                    message=f"the response ({len(data)} bytes) is larger than the broker takes",
                ),
            }
        )
        if (
            self._send_final(default, stripped.to_json(), None, qos, on_acked, retained=retained) is None
            and on_acked is not None
        ):
            on_acked()  # nothing the broker takes: the request is as settled as it can be

    def _send_final(
        self,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        qos: int,
        on_acked: Callable[[], None] | None,
        *,
        retained: bool,
    ) -> object:
        if self.finals is not None and qos > 0 and retained:  # retained a while, so a late subscriber still gets it
            if on_acked is None:
                return self.finals.publish(topic, payload, correlation)
            return self.finals.publish(topic, payload, correlation, on_acked=on_acked)
        # on_acked only when there is one: a transport that settles nothing need not know the keyword.
        if on_acked is None:
            return self.transport.publish(topic, payload, qos=qos, correlation_data=correlation)
        return self.transport.publish(topic, payload, qos=qos, correlation_data=correlation, on_acked=on_acked)

    def last(self, response: FinalResponse) -> None:
        self.transport.publish(self.topics.last, response.to_json(), qos=1, retain=True)

    def state(self, state: StatePayload) -> None:
        self.transport.publish(self.topics.state, state.to_json(), qos=1, retain=True)

    def health(self, health: HealthPayload) -> None:
        self.transport.publish(self.topics.health, health.to_json(), qos=1, retain=True)

    def model(self, info: ModelInfo) -> None:
        self.transport.publish(self.topics.model, info.to_json(), qos=1, retain=True)

    def error(self, event: ErrorEvent) -> None:
        log.warning("request_error", code=event.code, message=event.message, request_id=event.id)
        self.transport.publish(self.topics.error, event.to_json(), qos=1)

    def forward(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        *,
        on_acked: Callable[[], None] | None = None,
        handoff: str | None = None,
    ) -> None:
        """Pass a request on unchanged, MQTT 5 reply properties included, with its hand-off token (MQTT 5)."""
        self.transport.publish(
            topic,
            payload,
            qos=1,
            correlation_data=correlation,
            response_topic=response_topic,
            on_acked=on_acked,
            handoff=handoff,
        )

    def raw(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.transport.publish(topic, payload, qos=1, retain=retain)
