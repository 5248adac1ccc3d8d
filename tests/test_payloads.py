"""The contract's payloads as the bridge builds them (docs/topics.md)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rkllm_mqtt.payloads import (
    FinalResponse,
    HealthPayload,
    RequestStatus,
    StatePayload,
    StreamChunk,
    stream_chunk_json,
    stream_chunk_prefix,
)


def test_health_says_when_the_bridge_started_and_not_a_stale_uptime() -> None:
    health = json.loads(HealthPayload(status="ok", runtime="ready", started_at=1_767_225_600.0).to_json())
    assert health == {
        "status": "ok",
        "runtime": "ready",
        "started_at": 1_767_225_600.0,
        "last_error": None,
        "restarts": 0,
        "version": "",
    }


def test_state_counts_rejections_apart_from_errors() -> None:
    state = json.loads(StatePayload(status="busy", request_id="q1", request_source="mqtt", rejected_total=2).to_json())
    assert state["rejected_total"] == 2 and state["errors_total"] == 0
    assert state["request_source"] == "mqtt"
    assert set(state) == {
        "status",
        "request_id",
        "request_source",
        "queue_depth",
        "requests_total",
        "errors_total",
        "rejected_total",
        "tokens_per_s",
        "ttft_ms",
    }


def test_output_models_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        RequestStatus(id="q1", status="queued", position=0, extra=1)  # type: ignore[call-arg]


def test_a_final_response_is_compact_json_with_every_documented_field() -> None:
    final = json.loads(FinalResponse(id="q1", state="done", text="hi", finish_reason="stop", node="n1").to_json())
    assert set(final) == {
        "id",
        "state",
        "text",
        "finish_reason",
        "error",
        "usage",
        "timing",
        "node",
        "model",
        "session",
        "ts",
    }
    assert final["usage"] == {"prompt_tokens": None, "completion_tokens": 0}


@pytest.mark.parametrize("text", ["", " hello", "漢字 😀", '"\\\n\t\x00\x7f', "\u2028"])
def test_a_stream_chunk_built_directly_is_byte_for_byte_the_models(text: str) -> None:
    built = stream_chunk_json(stream_chunk_prefix("kitchen-42"), 3, text)
    assert built == StreamChunk(id="kitchen-42", seq=3, text=text).to_json()
