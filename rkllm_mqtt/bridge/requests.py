"""Turning an MQTT message into a validated request, or into a rejection with its code (docs/topics.md).

Pure functions: no I/O here, so every rule can be tested on its own. Every client mistake is caught here:
whatever bytes arrive, the answer is a ``Request`` the runtime can run as it is, or a ``Rejection`` whose
message, id and reply topic can be published as they are. Nothing a client sends reaches the worker unchecked.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rkllm_mqtt.errors import ErrorCode, quote_input
from rkllm_mqtt.payloads import ID_PATTERN
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import ReplyTopics, is_under, topic_name_problem

# fullmatch, not match: with match, ID_PATTERN's "$" also matches before a trailing newline, and an id "x\n"
# would become a topic the broker refuses.
_ID_RE = re.compile(ID_PATTERN)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repeat_penalty")

# The runtime takes top_k and max_new_tokens as int32_t.
INT32_MAX = 2**31 - 1
# Sampling ranges a request may ask for. Beyond them a model only produces noise (or the runtime divides by
# zero), so a value outside is a mistake worth telling the client about.
TEMPERATURE_MAX = 2.0
REPEAT_PENALTY_MAX = 2.0
# A request is one flat JSON object: nothing in it nests. Deeper nesting is refused before the parser recurses.
MAX_JSON_DEPTH = 32
# Longer digit strings are replaced before int() sees them: Python refuses to convert more than 4,300 digits,
# and no field takes a number near 20 digits anyway.
MAX_INT_DIGITS = 20
# A JSON request may escape every character of its prompt and system prompt (up to 6 bytes for one byte of
# text) and carry a few small fields besides; anything larger cannot be a valid request.
JSON_ESCAPE_FACTOR = 6
JSON_FIELDS_BYTES = 65536
# Rejection messages list at most this many problems: a payload with 100,000 unknown fields gets a short answer.
MAX_LISTED_PROBLEMS = 5

# What each bounded field accepts, as the rejection message states it and docs/topics.md lists it.
ALLOWED: dict[str, str] = {
    "max_new_tokens": f"an integer from 1 to {INT32_MAX}, capped at runtime.max_new_tokens",
    "top_k": f"an integer from 1 to {INT32_MAX}",
    "temperature": f"a number from 0 to {TEMPERATURE_MAX:g}",
    "top_p": "a number above 0, at most 1",
    "repeat_penalty": f"a number from 0 to {REPEAT_PENALTY_MAX:g}",
    "timeout_s": "a number above 0, capped at limits.request_timeout_s",
    "session": "1 to 128 characters",
    "id": "1 to 64 characters of A-Z a-z 0-9 _ . : -",
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a string cannot go to the runtime (which takes C strings) or into a JSON reply, or None."""
    nul = value.find("\x00")
    if nul >= 0:
        return f"contains NUL (U+0000) at position {nul}"
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        code = ord(surrogate.group())
        return f"contains a lone surrogate (U+{code:04X}) at position {surrogate.start()}, which is not valid Unicode"
    return None


def _surrogate_problem(raw: dict[str, Any]) -> str | None:
    """Which field holds a lone surrogate (a JSON escape like \\ud800 on its own), or None.

    Such a string cannot be encoded as UTF-8: not for the runtime, not for a reply. Checked before the model so
    the client hears which field and where.
    """
    for key, value in raw.items():  # the keys are RequestBody's own: unknown ones were refused before
        if isinstance(value, str) and not _encodable(value):
            return f"{quote_input(key)} {text_problem(value)}"
    return None


def _unknown_fields_problem(raw: dict[str, Any]) -> str | None:
    """The fields RequestBody does not know, named before the model sees them: a set difference, however many."""
    unknown = [key for key in raw if key not in RequestBody.model_fields]
    if not unknown:
        return None
    named = "; ".join(f"unknown field {quote_input(key)}" for key in unknown[:MAX_LISTED_PROBLEMS])
    more = len(unknown) - MAX_LISTED_PROBLEMS
    return named + (f"; and {more} more" if more > 0 else "")


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RequestBody(BaseModel):
    """The JSON request of docs/topics.md. Unknown fields are refused so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    prompt: str = Field(min_length=1)
    id: str | None = Field(None, pattern=ID_PATTERN)
    system: str | None = None
    session: str | None = Field(None, min_length=1, max_length=128)
    max_new_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE_MAX)
    top_k: int | None = Field(None, ge=1, le=INT32_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, ge=0.0, le=REPEAT_PENALTY_MAX)
    stream: bool = True
    timeout_s: float | None = Field(None, gt=0.0)
    response_topic: str | None = None

    @field_validator("prompt", "system", "session")
    @classmethod
    def _runtime_can_take(cls, value: str | None) -> str | None:
        # The runtime takes C strings: a NUL would cut the text short. (Surrogates never get here: see
        # _surrogate_problem.)
        if value is not None and "\x00" in value:
            raise ValueError(f"contains NUL (U+0000) at position {value.index(chr(0))}")
        return value


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
    max_system_bytes: int = 16384
    max_reply_topic_bytes: int = 256
    # runtime.max_new_tokens: a request may ask for fewer tokens, never for more. None: no cap here.
    max_new_tokens: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, node_root: str) -> RequestRules:
        """The rules a front door applies, from the settings; ``node_root`` is the node's own ``{base}/{node}``."""
        return cls(
            max_prompt_bytes=settings.limits.max_prompt_bytes,
            request_timeout_s=settings.limits.request_timeout_s,
            reply_prefixes=tuple(settings.reply_prefixes()),
            forbidden_roots=(settings.homeassistant.discovery_prefix, node_root),
            max_system_bytes=settings.limits.max_system_bytes,
            max_reply_topic_bytes=settings.limits.max_reply_topic_bytes,
            max_new_tokens=settings.runtime.max_new_tokens,
        )

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload that can be a valid request; larger ones are refused unread."""
        return JSON_ESCAPE_FACTOR * (self.max_prompt_bytes + self.max_system_bytes) + JSON_FIELDS_BYTES


def new_request_id() -> str:
    return f"r-{uuid.uuid4().hex[:16]}"


def is_request_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def reply_topic_problem(topic: str, rules: RequestRules) -> str | None:
    """Why a reply topic is refused, or None when it is allowed.

    The topic must be one the broker takes (topics.topic_name_problem, capped at ``max_reply_topic_bytes``), and so
    must the ``/stream`` and ``/status`` topics the bridge builds below it; it must lie under an allowed prefix and
    outside the roots the bridge never writes a reply to.
    """
    shown = quote_input(topic)
    problem = topic_name_problem(topic, max_bytes=rules.max_reply_topic_bytes)
    if problem is not None:
        return f"reply topic {shown} {problem} (limits.max_reply_topic_bytes = {rules.max_reply_topic_bytes})"
    reply = ReplyTopics(topic)
    for derived in (reply.stream, reply.status):
        problem = topic_name_problem(derived)
        if problem is not None:
            return f"reply topic {shown}: its {derived[len(topic) :]!r} topic {problem}"
    for root in rules.forbidden_roots:
        if is_under(topic, root):
            return f"reply topic {shown} is under {root!r}, which the bridge never writes to for a request"
    if not any(is_under(topic, prefix) for prefix in rules.reply_prefixes):
        allowed = ", ".join(rules.reply_prefixes) or "(none)"
        return f"reply topic {shown} is not under an allowed prefix ({allowed}): see limits.response_topic_prefixes"
    return None


def _describe_validation(exc: ValidationError) -> str:
    problems = []
    errors = exc.errors()
    for err in errors[:MAX_LISTED_PROBLEMS]:
        field = ".".join(str(part) for part in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field {quote_input(field)}")
        elif err["type"] == "missing":
            problems.append(f"'{field}' is required")
        else:
            # The field named here is one of RequestBody's own: a client's text never reaches the message.
            msg = err["msg"].removeprefix("Value error, ")
            allowed = ALLOWED.get(field)
            problems.append(f"'{field}': {msg}" + (f" (allowed: {allowed})" if allowed else ""))
    if len(errors) > MAX_LISTED_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_LISTED_PROBLEMS} more")
    return "; ".join(problems)


# -- bounded JSON ----------------------------------------------------------------------------------------------

# A JSON string, or the rest of the text after an opening quote when it never closes: every quote starts a match
# that succeeds, so the scan stays linear whatever the text (no match is tried and abandoned quote after quote).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply ``text`` nests arrays and objects, brackets inside strings not counted. Never recurses."""
    brackets = _JSON_BRACKETS.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets), initial=0))


# Stands in for an integer of more than MAX_INT_DIGITS digits: out of every field's range, so the field is named.
_HUGE: int = 10**MAX_INT_DIGITS


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        return -_HUGE if digits.startswith("-") else _HUGE
    return int(digits)


def _load_json(text: str) -> Any:
    """json.loads with the nesting depth and the integer size bounded before anything is converted."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested {depth} levels deep; a request is one flat object")
    return json.loads(text, parse_int=_bounded_int, object_pairs_hook=_object_without_repeats)


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is refused, since peers disagree on which one counts (last, first, error)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"the key {quote_input(key, 40)} appears more than once")
        obj[key] = value
    return obj


# -- requests --------------------------------------------------------------------------------------------------


def parse_request(
    payload: bytes,
    *,
    rules: RequestRules,
    received_at: float,
    property_reply_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> Request | Rejection:
    if len(payload) > rules.max_payload_bytes:
        return Rejection(
            "prompt_too_long",
            f"the request is {len(payload)} bytes; no request can be larger than {rules.max_payload_bytes} "
            "(6 x (limits.max_prompt_bytes + limits.max_system_bytes) + 64 KiB)",
            None,
            None,
            correlation_data,
        )
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
            raw = _load_json(text)
        except json.JSONDecodeError as exc:
            return Rejection(
                "invalid_json",
                f"payload is not valid JSON: {exc.msg} (character {exc.pos})",
                None,
                None,
                correlation_data,
            )
        except (ValueError, RecursionError) as exc:
            return Rejection("invalid_json", f"payload is not a valid request: {exc}", None, None, correlation_data)
        if not isinstance(raw, dict):
            return Rejection("invalid_json", "JSON request must be an object", None, None, correlation_data)
        raw_id = raw.get("id")
        if is_request_id(raw_id):
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
        problem = _unknown_fields_problem(raw) or _surrogate_problem(raw)
        if problem is not None:
            return Rejection("invalid_request", problem, known_id, reply, correlation_data)
        try:
            body = RequestBody.model_validate(raw)
        except ValidationError as exc:
            return Rejection("invalid_request", _describe_validation(exc), known_id, reply, correlation_data)
        prompt = body.prompt
    else:
        # A plain-text prompt gets its id now, so that even its refusal has a final on {b}/{n}/response/<id>.
        known_id = new_request_id()
        if reply is not None:
            problem = reply_topic_problem(reply, rules)
            if problem is not None:
                return Rejection("forbidden_topic", problem, known_id, None, correlation_data)
        prompt = text
        if not prompt.strip():
            return Rejection("invalid_request", "prompt is empty", known_id, reply, correlation_data)
        problem = text_problem(prompt)  # decoded UTF-8 holds no surrogate, but it may hold a NUL
        if problem is not None:
            return Rejection("invalid_request", f"'prompt' {problem}", known_id, reply, correlation_data)

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
    max_new_tokens: int | None = None
    if body is not None:
        if body.system is not None:
            system_size = len(body.system.encode("utf-8"))
            if system_size > rules.max_system_bytes:
                return Rejection(
                    "prompt_too_long",
                    f"system is {system_size} bytes; the limit is {rules.max_system_bytes} (limits.max_system_bytes)",
                    request_id,
                    reply,
                    correlation_data,
                )
        picked = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
        sampling = picked or None
        if body.timeout_s is not None:
            timeout = min(body.timeout_s, rules.request_timeout_s)
        max_new_tokens = body.max_new_tokens
        if max_new_tokens is not None and rules.max_new_tokens is not None:
            # A request may ask for fewer tokens than the runtime's setting, never more: more is capped, as
            # timeout_s is, and the final response says finish_reason "length" when the cap was reached.
            max_new_tokens = min(max_new_tokens, rules.max_new_tokens)
    return Request(
        id=request_id,
        prompt=prompt,
        reply_topic=reply,
        correlation_data=correlation_data,
        session=body.session if body else None,
        system=body.system if body else None,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stream=body.stream if body else True,
        timeout_s=timeout,
        received_at=received_at,
    )


# -- abort and clear -------------------------------------------------------------------------------------------


def parse_abort(payload: bytes) -> str | Rejection | None:
    """The request id an abort names, None for "whatever is running", or why the payload names no request."""
    target = _control_text(payload, "abort")
    if isinstance(target, Rejection) or target is None:
        return target
    if not is_request_id(target):
        return Rejection("invalid_request", f"abort: {quote_input(target)} is not a request id ({ALLOWED['id']})")
    return target


def parse_clear(payload: bytes) -> str | Rejection | None:
    """The session a clear names, None for "whatever is held", or why the payload names no session."""
    session = _control_text(payload, "clear")
    if isinstance(session, Rejection) or session is None:
        return session
    if len(session) > 128 or text_problem(session) is not None:
        return Rejection("invalid_request", f"clear: {quote_input(session)} is not a session ({ALLOWED['session']})")
    return session


def _control_text(payload: bytes, what: str) -> str | Rejection | None:
    # An id or a session is short: a long payload is refused unread, so it is never decoded or quoted whole.
    if len(payload) > 1024:
        return Rejection("invalid_request", f"{what}: the payload is {len(payload)} bytes; an id or session is short")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return Rejection("invalid_utf8", f"{what}: payload is not valid UTF-8 (byte {exc.start})")
    return text or None
