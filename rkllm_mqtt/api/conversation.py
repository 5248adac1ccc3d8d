"""Conversations at prefill speed: reuse the KV cache when a chat request extends the last one.

Clients of the chat API (Home Assistant among them) send the whole conversation every turn. Prefilling it all
again costs the NPU time proportional to its length. When a request repeats the previous request's messages
and the answer the bridge gave, with the same system prompt and tools, it continues that conversation: the
same session (the runtime keeps it in the KV cache) and only the new messages as the prompt. Otherwise it is a
new session, prefilled from the whole conversation.

The runtime has one KV cache: a request of another conversation (or an MQTT request) in between takes it.
That is why every plan also carries the whole conversation (``replay``): the runtime prefills it instead of the
new turn when the cache no longer holds the session.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rkllm_mqtt.api.chat import Markup, check_turns, render_new_turn, render_replay, split_system
from rkllm_mqtt.api.shapes import ChatMessage
from rkllm_mqtt.api.toolcalls import ToolCall

Fingerprint = tuple[Any, ...]


def _arguments_key(arguments: dict[str, Any]) -> str:
    # Home Assistant drops empty arguments before it sends a call back: compare without them.
    kept = {k: v for k, v in arguments.items() if v is not None and v != ""}
    return json.dumps(kept, sort_keys=True, ensure_ascii=False)


def _calls_key(calls: Sequence[tuple[str, dict[str, Any]]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, _arguments_key(arguments)) for name, arguments in calls)


def message_key(message: ChatMessage) -> Fingerprint:
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
    return (message.role, message.content.strip(), _calls_key(calls))


def reply_key(text: str, calls: Sequence[ToolCall]) -> Fingerprint:
    return ("assistant", text.strip(), _calls_key([(c.name, c.arguments) for c in calls]))


@dataclass(frozen=True)
class Plan:
    """How to run one chat request."""

    session: str
    system: str | None
    prompt: str
    role: str
    replay: str
    reused: bool
    history: tuple[Fingerprint, ...]  # the request's messages, system included


@dataclass(frozen=True)
class _Held:
    session: str
    system: str | None
    tools: str | None
    history: tuple[Fingerprint, ...]  # messages and the answer given, as the next request must repeat them


class Conversations:
    """Remembers the one conversation the runtime's KV cache may hold for the chat API."""

    def __init__(self, markup: Markup) -> None:
        self.markup = markup
        self._lock = threading.Lock()
        self._held: _Held | None = None

    def plan(self, messages: Sequence[ChatMessage], tools: str | None, suffix: str = "") -> Plan:
        """Decide session and prompt. ``suffix`` (a format instruction) is added to whatever is prefilled.

        Raises ConversationError for messages that cannot be answered."""
        system, turns = split_system(messages)
        check_turns(turns)
        history = tuple(message_key(m) for m in messages)
        replay = render_replay(turns, self.markup) + suffix
        with self._lock:
            held = self._held
        if (
            held is not None
            and held.system == system
            and held.tools == tools
            and len(history) > len(held.history)
            and history[: len(held.history)] == held.history
        ):
            new = list(messages[len(held.history) :])
            if all(m.role in ("user", "tool") for m in new):
                role, prompt = render_new_turn(new)
                return Plan(held.session, system, prompt + suffix, role, replay, True, history)
        return Plan(f"http-{uuid.uuid4().hex[:12]}", system, replay, "user", replay, False, history)

    def settle(self, plan: Plan, tools: str | None, answer: tuple[str, Sequence[ToolCall]] | None) -> None:
        """After the run: remember the conversation with its answer, or (``None``: it failed) forget it."""
        with self._lock:
            if answer is None:
                if self._held is not None and self._held.session == plan.session:
                    self._held = None
                return
            text, calls = answer
            self._held = _Held(plan.session, plan.system, tools, (*plan.history, reply_key(text, calls)))

    def forget(self) -> None:
        with self._lock:
            self._held = None
