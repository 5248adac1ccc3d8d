"""Writing an Ollama conversation as the runtime's prompt.

The runtime wraps every prompt in the chat template (``prompt_prefix`` … ``prompt_postfix``; ChatML unless
configured otherwise) and adds the system prompt itself. A conversation that is not in the KV cache is
therefore written as one prompt whose earlier turns carry the template's own markup between them, so that
prefix + prompt + postfix is the whole conversation as the model was trained to read it. Tool calls and tool
results are written the way Qwen's template writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from rkllm_mqtt.api.shapes import ChatMessage, ToolCallIn
from rkllm_mqtt.runtime.template import CHATML_POSTFIX, CHATML_PREFIX

TOOL_RESPONSE_TAG = "tool_response"  # what rkllm_set_function_tools is told marks a tool's result


@dataclass(frozen=True)
class Markup:
    """The text between turns inside one prompt."""

    user_open: str  # starts a user turn that follows an assistant turn
    assistant_open: str  # ends a user turn and starts the assistant's
    assistant_close: str  # ends an assistant turn

    @classmethod
    def for_template(cls, prefix: str | None, postfix: str | None) -> Markup:
        if prefix is None and postfix is None:
            return cls(CHATML_PREFIX, CHATML_POSTFIX, "<|im_end|>\n")
        # A configured template names no end-of-turn marker; a newline is the best neutral guess.
        return cls(prefix or "", postfix or "", "\n")


class ConversationError(ValueError):
    """The messages cannot be a conversation to answer (a 400)."""


def render_tool_calls(calls: Sequence[ToolCallIn]) -> str:
    return "\n".join(
        f"<tool_call>\n{json.dumps({'name': c.function.name, 'arguments': c.function.arguments}, ensure_ascii=False)}"
        "\n</tool_call>"
        for c in calls
    )


def render_tool_result(content: str) -> str:
    return f"<{TOOL_RESPONSE_TAG}>\n{content}\n</{TOOL_RESPONSE_TAG}>"


def _user_side(message: ChatMessage) -> str:
    return render_tool_result(message.content) if message.role == "tool" else message.content


def _assistant_side(message: ChatMessage) -> str:
    parts = [message.content] if message.content else []
    if message.tool_calls:
        parts.append(render_tool_calls(message.tool_calls))
    return "\n".join(parts)


def split_system(messages: Sequence[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    """The leading system messages (joined) and the turns after them."""
    index = 0
    while index < len(messages) and messages[index].role == "system":
        index += 1
    system = "\n\n".join(m.content for m in messages[:index]) if index else None
    return system, list(messages[index:])


def check_turns(turns: Sequence[ChatMessage]) -> None:
    if not turns:
        raise ConversationError("'messages' has no user message to answer")
    if turns[-1].role not in ("user", "tool"):
        raise ConversationError(f"the last message must come from 'user' or 'tool', not '{turns[-1].role}'")
    for message in turns:
        if message.images:
            raise ConversationError("images are not supported: the loaded model reads text only")


def render_replay(turns: Sequence[ChatMessage], markup: Markup) -> str:
    """The whole conversation (after the system prompt) as one prompt for the template to wrap."""
    out: list[str] = []
    previous: str | None = None
    for message in turns:
        side = "assistant" if message.role == "assistant" else "user"
        text = _assistant_side(message) if side == "assistant" else _user_side(message)
        if previous is None:
            if side == "assistant":
                out.append(markup.assistant_open)
        elif side == previous:
            out.append("\n")
        elif side == "assistant":
            out.append(markup.assistant_open)
        else:
            out.append(markup.assistant_close + markup.user_open)
        out.append(text)
        previous = side
    return "".join(out)


def render_new_turn(new: Sequence[ChatMessage]) -> tuple[str, str]:
    """(role, prompt) for the messages that follow the conversation held in the KV cache.

    Tool results alone go in as role ``tool`` (several as one JSON array, as the runtime's own server demo
    sends them); anything with a user message goes in as ``user``."""
    if any(m.role in ("assistant", "system") for m in new):
        raise ConversationError("a new turn holds only user and tool messages")
    if all(m.role == "tool" for m in new):
        if len(new) == 1:
            return "tool", new[0].content
        values = []
        for m in new:
            try:
                values.append(json.loads(m.content))
            except ValueError:
                values.append(m.content)
        return "tool", json.dumps(values, ensure_ascii=False)
    return "user", "\n".join(_user_side(m) for m in new)
