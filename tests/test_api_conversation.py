"""Rendering conversations and deciding when the KV cache is reused (pure functions, no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rkllm_mqtt.api.chat import ConversationError, Markup, render_new_turn, render_replay
from rkllm_mqtt.api.conversation import Conversations
from rkllm_mqtt.api.formats import AnswerFormat, FormatError
from rkllm_mqtt.api.shapes import ChatMessage
from rkllm_mqtt.api.toolcalls import ToolCall

CHATML = Markup.for_template(None, None)


def msgs(*items: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(item) for item in items]


SYSTEM = {"role": "system", "content": "You control a house."}
TOOLS = json.dumps([{"type": "function", "function": {"name": "HassTurnOn", "parameters": {}}}])


def test_replay_writes_earlier_turns_in_chatml_between_prefix_and_postfix() -> None:
    turns = msgs(
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "lights on"},
    )
    text = render_replay(turns, CHATML)
    assert text == "hi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nlights on"


def test_replay_writes_tool_calls_and_results_as_qwen_does() -> None:
    turns = msgs(
        {"role": "user", "content": "lights on"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "x"}}}],
        },
        {"role": "tool", "content": '{"success": true}'},
    )
    text = render_replay(turns, CHATML)
    assert '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "x"}}\n</tool_call>' in text
    assert text.endswith('<|im_start|>user\n<tool_response>\n{"success": true}\n</tool_response>')


def test_new_turn_of_tool_results_is_role_tool() -> None:
    assert render_new_turn(msgs({"role": "tool", "content": "ok"})) == ("tool", "ok")
    role, prompt = render_new_turn(msgs({"role": "tool", "content": '{"a": 1}'}, {"role": "tool", "content": "two"}))
    assert (role, json.loads(prompt)) == ("tool", [{"a": 1}, "two"])
    assert render_new_turn(msgs({"role": "user", "content": "next"})) == ("user", "next")


def test_conversation_must_end_with_user_or_tool() -> None:
    conversations = Conversations(CHATML)
    with pytest.raises(ConversationError):
        conversations.plan(msgs(SYSTEM, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), None)
    with pytest.raises(ConversationError):
        conversations.plan(msgs(SYSTEM), None)


def test_extending_the_last_conversation_reuses_its_session_and_sends_only_the_new_turn() -> None:
    conversations = Conversations(CHATML)
    first = conversations.plan(msgs(SYSTEM, {"role": "user", "content": "turn the light on"}), TOOLS)
    assert not first.reused
    assert first.system == "You control a house."
    call = ToolCall("HassTurnOn", {"name": "light", "area": ""})
    conversations.settle(first, TOOLS, ("", [call]))
    # Home Assistant sends the call back without its empty arguments, then the tool's result.
    second = conversations.plan(
        msgs(
            SYSTEM,
            {"role": "user", "content": "turn the light on"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "light"}}}],
            },
            {"role": "tool", "content": '{"success": true}'},
        ),
        TOOLS,
    )
    assert second.reused
    assert second.session == first.session
    assert (second.role, second.prompt) == ("tool", '{"success": true}')
    assert "turn the light on" in second.replay  # the whole conversation, should the cache have lost it


def test_a_different_system_prompt_tools_or_history_starts_a_new_session() -> None:
    conversations = Conversations(CHATML)
    base = msgs(SYSTEM, {"role": "user", "content": "q1"})
    first = conversations.plan(base, None)
    conversations.settle(first, None, ("a1", []))
    follow = [*base, *msgs({"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"})]
    assert conversations.plan(follow, None).reused
    assert not conversations.plan(follow, TOOLS).reused
    other_system = [ChatMessage(role="system", content="Another prompt"), *follow[1:]]
    assert not conversations.plan(other_system, None).reused
    edited = [*base, *msgs({"role": "assistant", "content": "something else"}, {"role": "user", "content": "q2"})]
    assert not conversations.plan(edited, None).reused


def test_a_failed_turn_forgets_the_conversation() -> None:
    conversations = Conversations(CHATML)
    base = msgs(SYSTEM, {"role": "user", "content": "q1"})
    first = conversations.plan(base, None)
    conversations.settle(first, None, ("a1", []))
    follow = [*base, *msgs({"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"})]
    second = conversations.plan(follow, None)
    conversations.settle(second, None, None)  # aborted: the cache holds part of a turn nobody will repeat
    again = conversations.plan(follow, None)
    assert not again.reused
    assert again.session != first.session


def test_format_instruction_and_check() -> None:
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
    fmt = AnswerFormat.from_request(schema)
    assert fmt is not None
    assert '"required":["on"]' in fmt.instruction()
    assert fmt.check('```json\n{"on": true}\n```') == '{"on": true}'
    with pytest.raises(FormatError, match="not valid JSON"):
        fmt.check("yes it is on")
    with pytest.raises(FormatError, match="does not follow the schema"):
        fmt.check('{"on": "yes"}')
    plain = AnswerFormat.from_request("json")
    assert plain is not None and plain.check("[1, 2]") == "[1, 2]"
    assert AnswerFormat.from_request("") is None
    with pytest.raises(FormatError, match="not a valid JSON schema"):
        AnswerFormat.from_request({"type": "no-such-type"})
