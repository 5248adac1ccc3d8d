"""Turning an MQTT message into a validated request, or into a rejection with its code (SPEC §4-§5).

Pure functions: no I/O here, so every rule can be tested on its own.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rkllm_mqtt.errors import ErrorCode
from rkllm_mqtt.payloads import ID_PATTERN
from rkllm_mqtt.topics import is_under

_ID_RE = re.compile(ID_PATTERN)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repeat_penalty")


class RequestBody(BaseModel):
    """The JSON request of SPEC §4. Unknown fields are refused so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(min_length=1)
    id: str | None = Field(None, pattern=ID_PATTERN)
    system: str | None = None
    session: str | None = Field(None, min_length=1, max_length=128)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, ge=0.0)
    stream: bool = True
    timeout_s: float | None = Field(None, gt=0.0)
    response_topic: str | None = None


@dataclass(frozen=True)
class Request:
    """An accepted request, ready for the scheduler."""

    id: str
    prompt: str
    reply_topic: str | None
    correlation_data: bytes | None
    session: str | None
    system: str | None
    max_new_tokens: int | None
    sampling: dict[str, float] | None
    stream: bool
    timeout_s: float
    received_at: float


@dataclass(frozen=True)
class Rejection:
    code: ErrorCode
    message: str
    id: str | None = None
    reply_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class RequestRules:
    max_prompt_bytes: int
    request_timeout_s: float
    reply_prefixes: tuple[str, ...]
    forbidden_roots: tuple[str, ...]


def new_request_id() -> str:
    return f"r-{uuid.uuid4().hex[:16]}"


def reply_topic_problem(topic: str, rules: RequestRules) -> str | None:
    """Why a reply topic is refused, or None when it is allowed."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return f"reply topic {topic!r} is empty or has a wildcard"
    if topic.startswith("$"):
        return f"reply topic {topic!r} starts with '$'"
    for root in rules.forbidden_roots:
        if is_under(topic, root):
            return f"reply topic {topic!r} is under {root!r}, which the bridge never writes to for a request"
    if not any(is_under(topic, prefix) for prefix in rules.reply_prefixes):
        allowed = ", ".join(rules.reply_prefixes) or "(none)"
        return f"reply topic {topic!r} is not under an allowed prefix ({allowed}): see limits.response_topic_prefixes"
    return None


def _describe_validation(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field '{field}'")
        elif err["type"] == "missing":
            problems.append(f"'{field}' is required")
        else:
            problems.append(f"'{field}': {err['msg']}")
    return "; ".join(problems)


def parse_request(
    payload: bytes,
    *,
    rules: RequestRules,
    received_at: float,
    property_reply_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> Request | Rejection:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("invalid_utf8", f"payload is not valid UTF-8 (byte {exc.start})", None, None, correlation_data)

    # The reply topic is checked first: a rejection must know where it may be answered.
    reply = property_reply_topic
    body: RequestBody | None = None
    known_id: str | None = None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            return Rejection("invalid_json", f"payload is not valid JSON: {exc.msg} at position {exc.pos}")
        if not isinstance(raw, dict):
            return Rejection("invalid_json", "JSON request must be an object")
        raw_id = raw.get("id")
        if isinstance(raw_id, str) and _ID_RE.match(raw_id):
            known_id = raw_id
        json_reply = raw.get("response_topic")
        if isinstance(json_reply, str):
            reply = json_reply
        elif json_reply is not None:
            return Rejection("invalid_request", "'response_topic' must be a string", known_id, None, correlation_data)
        if reply is not None:
            problem = reply_topic_problem(reply, rules)
            if problem is not None:
                return Rejection("forbidden_topic", problem, known_id, None, correlation_data)
        try:
            body = RequestBody.model_validate(raw)
        except ValidationError as exc:
            return Rejection("invalid_request", _describe_validation(exc), known_id, reply, correlation_data)
        prompt = body.prompt
    else:
        if reply is not None:
            problem = reply_topic_problem(reply, rules)
            if problem is not None:
                return Rejection("forbidden_topic", problem, None, None, correlation_data)
        prompt = text
        if not prompt.strip():
            return Rejection("invalid_request", "prompt is empty", None, reply, correlation_data)

    request_id = known_id or new_request_id()
    size = len(prompt.encode("utf-8"))
    if size > rules.max_prompt_bytes:
        return Rejection(
            "prompt_too_long",
            f"prompt is {size} bytes; the limit is {rules.max_prompt_bytes} (limits.max_prompt_bytes)",
            request_id,
            reply,
            correlation_data,
        )
    sampling: dict[str, float] | None = None
    timeout = rules.request_timeout_s
    if body is not None:
        picked = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
        sampling = picked or None
        if body.timeout_s is not None:
            timeout = min(body.timeout_s, rules.request_timeout_s)
    return Request(
        id=request_id,
        prompt=prompt,
        reply_topic=reply,
        correlation_data=correlation_data,
        session=body.session if body else None,
        system=body.system if body else None,
        max_new_tokens=body.max_new_tokens if body else None,
        sampling=sampling,
        stream=body.stream if body else True,
        timeout_s=timeout,
        received_at=received_at,
    )
