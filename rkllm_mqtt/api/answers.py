"""Ollama's response bodies for chat and generate: the streamed pieces and the final object."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rkllm_mqtt.api.reply import Pieces
from rkllm_mqtt.api.toolcalls import ToolCall
from rkllm_mqtt.core.jobs import GenerationResult
from rkllm_mqtt.errors import ErrorCode

# HTTP status of each error code (Ollama's bodies are {"error": "..."}).
STATUS_FOR_CODE: dict[ErrorCode, int] = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_utf8": 400,
    "prompt_too_long": 400,
    "unsupported": 400,
    "forbidden_topic": 400,
    "queue_full": 503,
    "not_ready": 503,
    "timeout": 504,
    "aborted": 500,
    "runtime_error": 500,
    "runtime_crashed": 500,
    "runtime_hung": 500,
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(ms: float | None) -> int:
    return round((ms or 0.0) * 1_000_000)


def final_stats(result: GenerationResult, total_ms: float) -> dict[str, Any]:
    return {
        "done_reason": result.finish_reason,
        "total_duration": _ns(total_ms),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens or 0,
        "prompt_eval_duration": _ns(result.ttft_ms),
        "eval_count": result.completion_tokens,
        "eval_duration": _ns(result.generate_ms),
    }


class ChatAnswer:
    """``/api/chat``: pieces go out as ``message`` deltas; tool calls as ``message.tool_calls``."""

    def __init__(self, model: str, *, thinking: bool) -> None:
        self.model = model
        self.thinking = thinking

    def _message(self, text: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.thinking and thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [call.as_ollama() for call in calls]
        return message

    def has_output(self, pieces: Pieces) -> bool:
        return bool(pieces.text or pieces.calls or (self.thinking and pieces.thinking))

    def piece(self, pieces: Pieces) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            "message": self._message(pieces.text, pieces.thinking, pieces.calls),
            "done": False,
        }

    def last(self, result: GenerationResult, total_ms: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            **final_stats(result, total_ms),
        }

    def whole(
        self, text: str, thinking: str, calls: list[ToolCall], result: GenerationResult, total_ms: float
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            "message": self._message(text, thinking, calls),
            "done": True,
            **final_stats(result, total_ms),
        }

    def loaded(self, reason: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
        }


class GenerateAnswer:
    """``/api/generate``: pieces go out as ``response`` (and ``thinking``)."""

    def __init__(self, model: str, *, thinking: bool) -> None:
        self.model = model
        self.thinking = thinking

    def has_output(self, pieces: Pieces) -> bool:
        return bool(pieces.text or (self.thinking and pieces.thinking))

    def _fields(self, text: str, thinking: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"response": text}
        if self.thinking and thinking:
            fields["thinking"] = thinking
        return fields

    def piece(self, pieces: Pieces) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            **self._fields(pieces.text, pieces.thinking),
            "done": False,
        }

    def last(self, result: GenerationResult, total_ms: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            "response": "",
            "done": True,
            **final_stats(result, total_ms),
        }

    def whole(
        self, text: str, thinking: str, calls: list[ToolCall], result: GenerationResult, total_ms: float
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            **self._fields(text, thinking),
            "done": True,
            **final_stats(result, total_ms),
        }

    def loaded(self, reason: str) -> dict[str, Any]:
        return {"model": self.model, "created_at": now_iso(), "response": "", "done_reason": reason, "done": True}


Answer = ChatAnswer | GenerateAnswer
