"""The JSON bodies of Ollama's API that the bridge accepts, as typed models.

Unknown fields are ignored, as Ollama itself does (clients send fields of newer versions); fields that are
present are validated, and a bad value is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Role = Literal["system", "user", "assistant", "tool"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ToolCallFunction(_Body):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_may_be_a_json_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                return value
        return {} if value is None else value


class ToolCallIn(_Body):
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Role
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value


class Options(_Body):
    """The options the runtime can honour; the others (num_ctx, seed, ...) are accepted and ignored."""

    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repeat_penalty: float | None = Field(None, ge=0.0)
    num_predict: int | None = None

    def sampling(self) -> dict[str, float] | None:
        # top_k stays an int: the runtime's struct field is an integer.
        picked: dict[str, float] = {
            name: value
            for name in ("temperature", "top_p", "top_k", "repeat_penalty")
            if (value := getattr(self, name)) is not None
        }
        return picked or None

    def max_new_tokens(self) -> int | None:
        # Ollama: -1 is "no limit", -2 "fill the context"; both mean the configured maximum here.
        return self.num_predict if self.num_predict is not None and self.num_predict > 0 else None


FormatSpec = Literal["", "json"] | dict[str, Any] | None


class _Generation(_Body):
    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: FormatSpec = None
    keep_alive: str | float | None = None
    think: bool | Literal["low", "medium", "high"] | None = None

    @property
    def thinking(self) -> bool:
        return bool(self.think)


class ChatBody(_Generation):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generation):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    raw: bool = False
    template: str | None = None
    suffix: str | None = None


class ModelBody(_Body):
    """``/api/show`` and ``/api/pull``: the model is ``model`` (older clients send ``name``)."""

    model: str | None = None
    name: str | None = None
    stream: bool = True

    @property
    def target(self) -> str:
        return self.model or self.name or ""


def describe(exc: ValidationError) -> str:
    """A short, field-naming message for a 400."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "body"
        problems.append(f"'{where}' is required" if err["type"] == "missing" else f"'{where}': {err['msg']}")
    return "; ".join(problems[:5])
