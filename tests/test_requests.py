"""parse_request and the topic rules, as pure functions: every payload gets a Request or a coded Rejection.

No broker and no process here. The property tests feed random bytes, random JSON and mutated valid requests and
check what comes out can be published as it is: ids and reply topics the broker takes, messages that serialize.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkllm_mqtt.bridge.requests import (
    INT32_MAX,
    MAX_JSON_DEPTH,
    REPEAT_PENALTY_MAX,
    TEMPERATURE_MAX,
    Rejection,
    Request,
    RequestRules,
    is_request_id,
    json_depth,
    parse_abort,
    parse_clear,
    parse_request,
    reply_topic_problem,
)
from rkllm_mqtt.errors import ERROR_CODES
from rkllm_mqtt.payloads import ErrorEvent, ErrorInfo, FinalResponse, StreamChunk
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import MAX_TOPIC_LEVELS, ReplyTopics, Topics, topic_name_problem

TOPICS = Topics("rkllm", "node1")
RULES = RequestRules(
    max_prompt_bytes=4096,
    request_timeout_s=300.0,
    reply_prefixes=("rkllm/reply",),
    forbidden_roots=("homeassistant", TOPICS.root),
    max_system_bytes=2048,
    max_reply_topic_bytes=256,
    max_new_tokens=50,
)


def parse(payload: bytes | str, *, reply: str | None = None, rules: RequestRules = RULES) -> Request | Rejection:
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8")
    return parse_request(data, rules=rules, received_at=0.0, property_reply_topic=reply)


def request(**fields: Any) -> bytes:
    """A JSON request; ``\\ud800`` in a value stays a JSON escape, as a client would send it."""
    return json.dumps({"id": "r1", "prompt": "hi", **fields}).encode("ascii")


def rejected(result: Request | Rejection, code: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.code == code, result
    return result


def accepted(result: Request | Rejection) -> Request:
    assert isinstance(result, Request), result
    return result


def assert_publishable(result: Request | Rejection, rules: RequestRules = RULES) -> None:
    """What the bridge does with the result cannot fail: every topic it builds is valid, every payload serializes."""
    if isinstance(result, Rejection):
        assert result.code in ERROR_CODES
        assert len(result.message) <= 2000
        ErrorEvent(code=result.code, message=result.message, id=result.id).to_json()
        if result.id is not None:
            assert is_request_id(result.id)
            final = FinalResponse(
                id=result.id,
                state="error",
                finish_reason="error",
                error=ErrorInfo(code=result.code, message=result.message),
                node=TOPICS.node,
            )
            final.to_json()
            for topic in (TOPICS.response(result.id), *_derived(result.reply_topic)):
                assert topic_name_problem(topic) is None, topic
        if result.reply_topic is not None:
            assert reply_topic_problem(result.reply_topic, rules) is None
        return
    assert is_request_id(result.id)
    assert result.prompt
    for text in (result.prompt, result.system, result.session):
        if text is not None:
            assert "\x00" not in text
            text.encode("utf-8")  # no lone surrogate
    assert len(result.prompt.encode("utf-8")) <= rules.max_prompt_bytes
    assert result.system is None or len(result.system.encode("utf-8")) <= rules.max_system_bytes
    assert result.session is None or 1 <= len(result.session) <= 128
    if result.max_new_tokens is not None:
        assert 1 <= result.max_new_tokens <= (rules.max_new_tokens or INT32_MAX)
    assert 0 < result.timeout_s <= rules.request_timeout_s
    for name, value in (result.sampling or {}).items():
        assert math.isfinite(value), name
    sampling = result.sampling or {}
    assert 1 <= sampling.get("top_k", 1) <= INT32_MAX
    assert 0 <= sampling.get("temperature", 0) <= TEMPERATURE_MAX
    assert 0 < sampling.get("top_p", 1) <= 1
    assert 0 <= sampling.get("repeat_penalty", 0) <= REPEAT_PENALTY_MAX
    for topic in (TOPICS.response(result.id), *_derived(result.reply_topic)):
        assert topic_name_problem(topic) is None, topic
    StreamChunk(id=result.id, seq=0, text=result.prompt).to_json()
    FinalResponse(
        id=result.id, state="done", text=result.prompt, finish_reason="stop", node="n", session=result.session
    ).to_json()


def _derived(reply: str | None) -> tuple[str, ...]:
    if reply is None:
        return ()
    topics = ReplyTopics(reply)
    return (topics.final, topics.stream, topics.status)


# -- topic names ---------------------------------------------------------------------------------------------------

REFUSED_CHARACTERS = [
    "\x00",
    "\x01",
    "\x1f",
    "\x7f",
    "\x9f",
    "\ud800",
    "\udfff",
    "\ufdd0",
    "\ufdef",
    "\ufffe",
    "\uffff",
    "\U0001fffe",
    "\U0001ffff",
    "\U0010fffe",
    "\U0010ffff",
]
# The neighbours of every refused range, which a topic may hold.
ALLOWED_CHARACTERS = [" ", "~", "\xa0", "\ud7ff", "\ue000", "\ufdcf", "\ufdf0", "\ufffd", "\U0001fffd", "\U00020000"]


@pytest.mark.parametrize("char", REFUSED_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_topic_with_a_character_the_broker_refuses(char: str) -> None:
    problem = topic_name_problem(f"rkllm/reply/x{char}y")
    assert problem is not None
    assert f"U+{ord(char):04X}" in problem and "position 13" in problem


@pytest.mark.parametrize("char", ALLOWED_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_topic_with_a_character_next_to_a_refused_range(char: str) -> None:
    assert topic_name_problem(f"rkllm/reply/x{char}y") is None


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("", "empty"),
        ("a/+/b", "wildcard"),
        ("a/#", "wildcard"),
        ("$SYS/x", "'$'"),
        ("/".join(["a"] * (MAX_TOPIC_LEVELS + 1)), "levels"),
    ],
)
def test_topic_shapes_the_broker_refuses(topic: str, fragment: str) -> None:
    problem = topic_name_problem(topic)
    assert problem is not None and fragment in problem


def test_topic_length_counts_utf8_bytes() -> None:
    assert topic_name_problem("a" * 65535) is None
    assert topic_name_problem("a" * 65536) is not None
    assert topic_name_problem("é" * 128, max_bytes=256) is None
    problem = topic_name_problem("é" * 129, max_bytes=256)
    assert problem is not None and "258 bytes" in problem
    # A lower cap never raises MQTT's own.
    assert topic_name_problem("a" * 65536, max_bytes=10**6) is not None


def test_topic_levels_at_the_limit() -> None:
    assert topic_name_problem("/".join(["a"] * MAX_TOPIC_LEVELS)) is None


@settings(deadline=None)  # a machine ten times slower must not fail on time
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300))
def test_a_topic_passes_only_when_the_broker_takes_it(topic: str) -> None:
    if topic_name_problem(topic, max_bytes=256) is None:
        encoded = topic.encode("utf-8")  # no surrogate
        assert 0 < len(encoded) <= 256
        assert not any(ch in topic for ch in "+#\x00") and not topic.startswith("$")
        for char in topic:
            code = ord(char)
            assert not (code <= 0x1F or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE)


@settings(deadline=None)  # a machine ten times slower must not fail on time
@given(st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z"))
def test_every_valid_id_makes_valid_topics(request_id: str) -> None:
    assert is_request_id(request_id)
    reply = ReplyTopics(TOPICS.response(request_id))
    for topic in (reply.final, reply.stream, reply.status):
        assert topic_name_problem(topic) is None


def test_an_id_with_a_trailing_newline_is_not_an_id() -> None:
    # re.match with "$" accepts "x\n"; that id would have made the topic ".../response/x\n".
    assert not is_request_id("x\n")
    result = rejected(parse(request(id="x\n")), "invalid_request")
    assert result.id is None and "'id'" in result.message


# -- reply topics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x01", "\x7f", "\ufdd0", "\U0001ffff", "\ud800", "\x00"])
def test_reply_topic_field_with_a_refused_character(char: str) -> None:
    result = rejected(parse(request(response_topic=f"rkllm/reply/x{char}")), "forbidden_topic")
    # The final of a refused reply topic goes to the default topic: the id is kept, the reply topic is not.
    assert result.id == "r1" and result.reply_topic is None
    assert f"U+{ord(char):04X}" in result.message
    assert_publishable(result)


@pytest.mark.parametrize("char", ["\x01", "\ud800", "\uffff"])
def test_reply_topic_property_with_a_refused_character(char: str) -> None:
    result = rejected(parse(request(), reply=f"rkllm/reply/p{char}"), "forbidden_topic")
    assert result.id == "r1" and result.reply_topic is None
    assert_publishable(result)
    rejected(parse("plain prompt", reply=f"rkllm/reply/p{char}"), "forbidden_topic")


@pytest.mark.parametrize("size", [65528, 65535, 70000])
def test_reply_topic_of_64_kib(size: int) -> None:
    topic = "rkllm/reply/" + "a" * (size - len("rkllm/reply/"))
    for result in (parse(request(response_topic=topic)), parse(request(), reply=topic)):
        refusal = rejected(result, "forbidden_topic")
        assert "max_reply_topic_bytes" in refusal.message
        assert len(refusal.message) < 300  # the topic is quoted, not copied


def test_reply_topic_cap_is_a_setting() -> None:
    topic = "rkllm/reply/" + "a" * 500
    rejected(parse(request(response_topic=topic)), "forbidden_topic")
    wide = RequestRules(**{**RULES.__dict__, "max_reply_topic_bytes": 1024})
    assert accepted(parse(request(response_topic=topic), rules=wide)).reply_topic == topic
    # Even a cap at MQTT's limit leaves room for the "/status" the bridge adds.
    widest = RequestRules(**{**RULES.__dict__, "max_reply_topic_bytes": 65535})
    longest = "rkllm/reply/" + "a" * (65535 - len("rkllm/reply/"))
    refusal = rejected(parse(request(response_topic=longest), rules=widest), "forbidden_topic")
    assert "/status" in refusal.message or "/stream" in refusal.message


def test_reply_topic_with_too_many_levels_for_its_stream_topic() -> None:
    deep = "rkllm/reply/" + "/".join(["a"] * (MAX_TOPIC_LEVELS - 2))
    assert topic_name_problem(deep) is None
    wide = RequestRules(**{**RULES.__dict__, "max_reply_topic_bytes": 65535})
    refusal = rejected(parse(request(response_topic=deep), rules=wide), "forbidden_topic")
    assert "levels" in refusal.message


@pytest.mark.parametrize("topic", ["rkllm/reply/+", "$SYS/x", "homeassistant/x", "rkllm/node1/state", "elsewhere"])
def test_reply_topics_outside_the_rules(topic: str) -> None:
    rejected(parse(request(response_topic=topic)), "forbidden_topic")


def test_reply_topic_accepted() -> None:
    result = accepted(parse(request(response_topic="rkllm/reply/küche")))
    assert result.reply_topic == "rkllm/reply/küche"
    assert accepted(parse("plain", reply="rkllm/reply/p")).reply_topic == "rkllm/reply/p"


# -- JSON bounded before parsing ---------------------------------------------------------------------------------


def test_json_nested_ten_thousand_deep() -> None:
    payload = '{"prompt": "x", "a": ' + "[" * 10000 + "]" * 10000 + "}"
    result = rejected(parse(payload), "invalid_json")
    assert "10001 levels" in result.message
    rejected(parse('{"a":' * 10000 + "1" + "}" * 10000), "invalid_json")


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('{"prompt": "[[[[{{{{", "x": "\\"[["}') == 1
    assert json_depth('{"a": [[1]]}') == 3
    # An unterminated string is scanned once, not once per quote.
    assert json_depth('{"' + '\\"' * 100000) == 1
    payload = '{"prompt": "' + "[" * 3000 + '"}'
    assert accepted(parse(payload)).prompt == "[" * 3000


def test_json_at_the_depth_limit_is_parsed() -> None:
    payload = '{"id": "deep", "prompt": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    result = rejected(parse(payload), "invalid_request")
    assert "'prompt'" in result.message and result.id == "deep"


@pytest.mark.parametrize("field", ["max_new_tokens", "top_k", "temperature", "unknown"])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integer_of_five_thousand_digits(field: str, sign: str) -> None:
    payload = '{"id": "big", "prompt": "x", "' + field + '": ' + sign + "9" * 5000 + "}"
    result = rejected(parse(payload), "invalid_request")
    assert field in result.message and result.id == "big"
    assert len(result.message) < 300


def test_float_of_five_thousand_digits() -> None:
    payload = '{"prompt": "x", "temperature": 1' + "0" * 5000 + ".5}"
    result = rejected(parse(payload), "invalid_request")
    assert "'temperature'" in result.message


def test_payload_above_what_any_request_can_be() -> None:
    limit = RULES.max_payload_bytes
    result = rejected(parse(b"{" + b" " * limit), "prompt_too_long")
    assert str(limit) in result.message
    # One byte less is read (and then refused for what it is).
    rejected(parse(b"{" + b" " * (limit - 1)), "invalid_json")


# -- field rules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "system", "session"])
def test_nul_in_text_fields(field: str) -> None:
    fields = {"prompt": "hi", field: "before\x00after"}
    result = rejected(parse(request(**fields)), "invalid_request")
    assert f"'{field}'" in result.message and "NUL" in result.message
    assert result.id == "r1"


def test_nul_in_a_plain_prompt() -> None:
    result = rejected(parse(b"hello\x00world"), "invalid_request")
    assert "NUL" in result.message


@pytest.mark.parametrize("field", ["prompt", "system", "session", "id", "stream"])
def test_lone_surrogate_in_any_field(field: str) -> None:
    fields: dict[str, Any] = {"prompt": "hi", field: "a\ud800b"}
    result = rejected(parse(request(**fields)), "invalid_request")
    assert_publishable(result)
    if field != "id":
        assert f"'{field}'" in result.message and "U+D800" in result.message


def test_lone_surrogate_in_a_field_name() -> None:
    result = rejected(parse(b'{"prompt": "x", "\\udc00": 1}'), "invalid_request")
    # Named escaped, so the message itself stays valid Unicode.
    assert "unknown field '\\udc00'" in result.message
    assert_publishable(result)


def test_surrogate_pair_escapes_are_one_character() -> None:
    assert accepted(parse(b'{"prompt": "\\ud83d\\ude00"}')).prompt == "\U0001f600"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**31),
        ("top_k", 0),
        ("max_new_tokens", 2**31),
        ("max_new_tokens", 10_000_000_000),
        ("max_new_tokens", 0),
        ("max_new_tokens", -1),
    ],
)
def test_integers_outside_int32(field: str, value: int) -> None:
    result = rejected(parse(request(**{field: value})), "invalid_request")
    assert f"'{field}'" in result.message and "2147483647" in result.message


def test_int32_max_is_accepted() -> None:
    result = accepted(parse(request(top_k=INT32_MAX, max_new_tokens=INT32_MAX)))
    assert result.sampling == {"top_k": INT32_MAX}
    assert result.max_new_tokens == RULES.max_new_tokens


@pytest.mark.parametrize("field", ["temperature", "top_p", "repeat_penalty", "timeout_s"])
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e308", "-1e308", "1e999"])
def test_non_finite_and_absurd_floats(field: str, literal: str) -> None:
    payload = '{"id": "f", "prompt": "x", "' + field + '": ' + literal + "}"
    result = parse(payload)
    if field == "timeout_s" and literal == "1e308":
        assert accepted(result).timeout_s == RULES.request_timeout_s  # capped, like any long timeout
        return
    refusal = rejected(result, "invalid_request")
    assert f"'{field}'" in refusal.message and "allowed:" in refusal.message


@pytest.mark.parametrize(
    ("field", "low", "high"),
    [("temperature", 0.0, TEMPERATURE_MAX), ("repeat_penalty", 0.0, REPEAT_PENALTY_MAX), ("top_p", 1e-9, 1.0)],
)
def test_float_ranges_are_inclusive(field: str, low: float, high: float) -> None:
    for value in (low, high):
        assert accepted(parse(request(**{field: value}))).sampling == {field: value}
    rejected(parse(request(**{field: high * 1.01})), "invalid_request")


def test_max_new_tokens_is_capped_by_the_runtime_setting() -> None:
    assert accepted(parse(request(max_new_tokens=10))).max_new_tokens == 10
    assert accepted(parse(request(max_new_tokens=100))).max_new_tokens == 50
    assert accepted(parse(request(max_new_tokens=1_000_000_000))).max_new_tokens == 50
    assert accepted(parse(request())).max_new_tokens is None


def test_system_has_its_own_size_limit() -> None:
    assert accepted(parse(request(system="s" * 2048))).system == "s" * 2048
    result = rejected(parse(request(system="é" * 1025)), "prompt_too_long")
    assert "max_system_bytes" in result.message and "2050" in result.message and result.id == "r1"


def test_many_unknown_fields_get_a_short_message() -> None:
    fields = {f"f{i}": 1 for i in range(5000)}
    result = rejected(parse(request(**fields)), "invalid_request")
    assert "and 4995 more" in result.message and len(result.message) < 500


def test_a_long_unknown_field_name_is_quoted_short() -> None:
    result = rejected(parse(request(**{"x" * 60000: 1})), "invalid_request")
    assert "60000 characters" in result.message and len(result.message) < 300


# -- abort and clear -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b"", None), (b"  \n", None), (b"kitchen-42", "kitchen-42"), (b" r1\n", "r1")],
)
def test_abort_names_a_request(payload: bytes, expected: str | None) -> None:
    assert parse_abort(payload) == expected


@pytest.mark.parametrize("payload", [b"\xff", b"a\x00", b"a/b", b"x" * 65, b"x" * 100_000, b"\xed\xa0\x80"])
def test_abort_with_a_hostile_payload(payload: bytes) -> None:
    result = parse_abort(payload)
    assert isinstance(result, Rejection) and result.code in ("invalid_request", "invalid_utf8")
    assert len(result.message) < 300
    ErrorEvent(code=result.code, message=result.message).to_json()


@pytest.mark.parametrize("payload", [b"\xff", b"s\x00", b"x" * 129, b"x" * 100_000])
def test_clear_with_a_hostile_payload(payload: bytes) -> None:
    result = parse_clear(payload)
    assert isinstance(result, Rejection) and result.code in ("invalid_request", "invalid_utf8")
    ErrorEvent(code=result.code, message=result.message).to_json()


def test_clear_names_a_session() -> None:
    assert parse_clear(b"") is None
    assert parse_clear("küche 2".encode()) == "küche 2"


@settings(deadline=None)  # a machine ten times slower must not fail on time
@given(st.binary(max_size=2000))
def test_abort_and_clear_never_raise(payload: bytes) -> None:
    for parsed in (parse_abort(payload), parse_clear(payload)):
        if isinstance(parsed, Rejection):
            ErrorEvent(code=parsed.code, message=parsed.message).to_json()
        elif parsed is not None:
            parsed.encode("utf-8")


# -- every payload: a Request or a coded Rejection -----------------------------------------------------------------

SMALL = RequestRules(
    max_prompt_bytes=64,
    request_timeout_s=30.0,
    reply_prefixes=("rkllm/reply",),
    forbidden_roots=("homeassistant", TOPICS.root),
    max_system_bytes=64,
    max_reply_topic_bytes=64,
    max_new_tokens=50,
)
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any code point, lone surrogates and non-characters included: json.dumps escapes what it must.
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=80)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "id",
    "system",
    "session",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repeat_penalty",
    "stream",
    "timeout_s",
    "response_topic",
]
VALID = {
    "id": "kitchen-42",
    "prompt": "Suggest a dinner.",
    "system": "Be brief.",
    "session": "kitchen",
    "max_new_tokens": 20,
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
    "stream": True,
    "timeout_s": 10,
    "response_topic": "rkllm/reply/kitchen",
}
reply_properties = st.none() | any_text | st.just("rkllm/reply/ok")


def _check(payload: bytes, reply: str | None = None) -> None:
    assert len(payload) <= SMALL.max_payload_bytes or isinstance(parse(payload, rules=SMALL), Rejection)
    assert_publishable(parse(payload, reply=reply, rules=SMALL), SMALL)


@HYPOTHESIS
@given(st.binary(max_size=4096), reply_properties)
def test_random_bytes(payload: bytes, reply: str | None) -> None:
    _check(payload, reply)
    _check(b"{" + payload, reply)


@HYPOTHESIS
@given(json_values, st.booleans(), reply_properties)
def test_random_json(value: Any, ascii_only: bool, reply: str | None) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    _check(text.encode("utf-8", errors="surrogatepass"), reply)


@HYPOTHESIS
@given(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    st.sets(st.sampled_from(FIELDS), max_size=3),
    st.dictionaries(any_text, json_values, max_size=2),
    reply_properties,
)
def test_mutated_valid_requests(
    changed: dict[str, Any], removed: set[str], extra: dict[str, Any], reply: str | None
) -> None:
    body = {**VALID, **changed, **extra}
    for name in removed:
        body.pop(name, None)
    _check(json.dumps(body).encode("ascii"), reply)


@HYPOTHESIS
@given(st.data())
def test_byte_mutations_of_a_valid_request(data: st.DataObject) -> None:
    payload = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert" or position == len(payload):
            payload[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "flip":
            payload[position] = data.draw(st.integers(0, 255))
        else:
            del payload[position]
    _check(bytes(payload))


def test_the_valid_request_is_accepted_whole() -> None:
    result = accepted(parse(json.dumps(VALID), rules=SMALL))
    assert result.id == "kitchen-42" and result.reply_topic == "rkllm/reply/kitchen"
    assert result.sampling == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
    assert result.max_new_tokens == 20 and result.timeout_s == 10 and result.session == "kitchen"
    assert_publishable(result, SMALL)


def test_rules_come_from_the_settings() -> None:
    configured = Settings(
        limits={"max_system_bytes": 100, "max_reply_topic_bytes": 40, "max_prompt_bytes": 300},
        runtime={"max_new_tokens": 7},
        mqtt={"node_id": "n1"},
    )
    rules = RequestRules.from_settings(configured, Topics("rkllm", "n1").root)
    assert (rules.max_system_bytes, rules.max_reply_topic_bytes, rules.max_new_tokens) == (100, 40, 7)
    assert rules.reply_prefixes == ("rkllm/reply",) and "rkllm/n1" in rules.forbidden_roots
    assert accepted(parse(request(max_new_tokens=100), rules=rules)).max_new_tokens == 7
    rejected(parse(request(system="s" * 101), rules=rules), "prompt_too_long")
    rejected(parse(request(response_topic="rkllm/reply/" + "a" * 30), rules=rules), "forbidden_topic")


def test_a_key_given_twice_is_refused_not_guessed() -> None:
    # Peers disagree on which of two equal keys counts; the bridge answers neither.
    result = rejected(parse('{"id": "z3", "id": "z4", "prompt": "hi"}'), "invalid_json")
    assert "'id' appears more than once" in result.message


def test_a_refused_plain_text_prompt_still_has_an_id_for_its_final() -> None:
    # Plain text gets a generated id; its refusal must carry it, or no final is published anywhere.
    forbidden = rejected(parse("plain text", reply="other/x"), "forbidden_topic")
    assert forbidden.id is not None and forbidden.reply_topic is None
    nul = rejected(parse("plain\x00text"), "invalid_request")
    assert nul.id is not None
