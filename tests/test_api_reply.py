"""Tool-call parsing and the streamed reply splitter (pure functions, no server)."""

from __future__ import annotations

import pytest

from rkllm_mqtt.api.reply import ReplySplitter
from rkllm_mqtt.api.toolcalls import ToolCall, parse_call_block

QWEN_CALL = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n</tool_call>'
XML_CALL = (
    "<function=HassTurnOff>\n<parameter=name>\nbedroom lamp\n</parameter>\n"
    "<parameter=brightness>\n40\n</parameter>\n</function>"
)


def feed_all(splitter: ReplySplitter, text: str, size: int) -> tuple[str, str]:
    """Feed ``text`` in pieces of ``size`` characters; return (text released, thinking released)."""
    out, thought = [], []
    for start in range(0, len(text), size):
        pieces = splitter.feed(text[start : start + size])
        out.append(pieces.text)
        thought.append(pieces.thinking)
    tail = splitter.finish()
    out.append(tail.text)
    thought.append(tail.thinking)
    return "".join(out), "".join(thought)


def test_qwen_json_call_is_parsed() -> None:
    assert parse_call_block(QWEN_CALL) == [ToolCall("HassTurnOn", {"name": "kitchen light"})]


def test_arguments_written_as_a_json_string_are_parsed() -> None:
    block = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_call_block(block) == [ToolCall("f", {"x": 1})]


def test_xml_like_call_is_parsed_with_typed_values() -> None:
    assert parse_call_block(XML_CALL) == [ToolCall("HassTurnOff", {"name": "bedroom lamp", "brightness": 40})]
    wrapped = f"<tool_call>\n{XML_CALL}\n</tool_call>"
    assert parse_call_block(wrapped) == [ToolCall("HassTurnOff", {"name": "bedroom lamp", "brightness": 40})]


@pytest.mark.parametrize("block", ["<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'])
def test_malformed_call_is_none(block: str) -> None:
    assert parse_call_block(block) is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_plain_text_passes_through_whole_in_any_cut(size: int) -> None:
    text = "The light is <b>on</b> now; 3 < 4 and <tool is a word."
    splitter = ReplySplitter(parse_tools=True)
    released, thought = feed_all(splitter, text, size)
    assert released == text
    assert thought == ""
    assert splitter.calls == []


@pytest.mark.parametrize("size", [1, 4, 11, 1000])
def test_calls_are_taken_out_of_the_text_in_any_cut(size: int) -> None:
    text = f"Sure.\n{QWEN_CALL}\n{XML_CALL}\n"
    splitter = ReplySplitter(parse_tools=True)
    released, _ = feed_all(splitter, text, size)
    assert released == "Sure.\n"
    assert splitter.calls == [
        ToolCall("HassTurnOn", {"name": "kitchen light"}),
        ToolCall("HassTurnOff", {"name": "bedroom lamp", "brightness": 40}),
    ]


def test_plain_text_streams_without_waiting_for_the_end() -> None:
    splitter = ReplySplitter(parse_tools=True)
    assert splitter.feed("Hello ").text == "Hello "
    assert splitter.feed("wor").text == "wor"
    held = splitter.feed("ld <tool")
    assert held.text == "ld "  # "<tool" could start a call: held back
    assert splitter.feed("box>").text == "<toolbox>"


def test_without_tools_markup_is_text() -> None:
    splitter = ReplySplitter(parse_tools=False)
    released, _ = feed_all(splitter, QWEN_CALL, 5)
    assert released == QWEN_CALL
    assert splitter.calls == []


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_leading_think_block_is_thinking(size: int) -> None:
    splitter = ReplySplitter(parse_tools=True)
    released, thought = feed_all(splitter, "<think>\nThe user wants light.\n</think>\n\nDone.", size)
    assert thought == "\nThe user wants light.\n"
    assert released == "Done."


def test_call_cut_off_by_the_token_limit_is_kept_when_it_parses_else_text() -> None:
    splitter = ReplySplitter(parse_tools=True)
    splitter.feed('<tool_call>{"name": "f", "arguments": {}}')
    tail = splitter.finish()
    assert tail.calls == [ToolCall("f", {})]
    broken = ReplySplitter(parse_tools=True)
    broken.feed('<tool_call>{"name": "f", "argu')
    assert broken.finish().text == '<tool_call>{"name": "f", "argu'
