"""Ollama's response bodies for chat and generate: the streamed pieces and the final object."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

from rkllm_mqtt.api.catalog import iso_time
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
    return iso_time(time.time())


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


class _Answer(ABC):
    """What chat and generate bodies share; a subclass says where the text goes (``_body``, ``_empty``)."""

    def __init__(self, model: str, *, thinking: bool) -> None:
        self.model = model
        self.thinking = thinking

    @abstractmethod
    def _body(self, text: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]: ...

    @abstractmethod
    def _empty(self) -> dict[str, Any]: ...

    def piece(self, pieces: Pieces) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            **self._body(pieces.text, pieces.thinking, pieces.calls),
            "done": False,
        }

    def last(self, result: GenerationResult, total_ms: float) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            **self._empty(),
            "done": True,
            **final_stats(result, total_ms),
        }

    def whole(
        self, text: str, thinking: str, calls: list[ToolCall], result: GenerationResult, total_ms: float
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": now_iso(),
            **self._body(text, thinking, calls),
            "done": True,
            **final_stats(result, total_ms),
        }

    def loaded(self, reason: str) -> dict[str, Any]:
        return {"model": self.model, "created_at": now_iso(), **self._empty(), "done_reason": reason, "done": True}


class ChatAnswer(_Answer):
    """``/api/chat``: pieces go out as ``message`` deltas; tool calls as ``message.tool_calls``."""

    def has_output(self, pieces: Pieces) -> bool:
        return bool(pieces.text or pieces.calls or (self.thinking and pieces.thinking))

    def _body(self, text: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.thinking and thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [call.as_ollama() for call in calls]
        return {"message": message}

    def _empty(self) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": ""}}


class GenerateAnswer(_Answer):
    """``/api/generate``: pieces go out as ``response`` (and ``thinking``); it has no tool calls."""

    def has_output(self, pieces: Pieces) -> bool:
        return bool(pieces.text or (self.thinking and pieces.thinking))

    def _body(self, text: str, thinking: str, calls: list[ToolCall]) -> dict[str, Any]:
        fields: dict[str, Any] = {"response": text}
        if self.thinking and thinking:
            fields["thinking"] = thinking
        return fields

    def _empty(self) -> dict[str, Any]:
        return {"response": ""}


Answer = ChatAnswer | GenerateAnswer
