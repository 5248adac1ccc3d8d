"""The KV-cache bookkeeping with function-calling tools: a conversation is its session, system prompt and tools."""

from __future__ import annotations

from rkllm_mqtt.runtime.kvcache import KvCache

TOOLS = '[{"type": "function", "function": {"name": "HassTurnOn"}}]'


def held_after(session: str | None, system: str | None, tools: str | None) -> KvCache:
    cache = KvCache()
    cache.begin(session, system, tools)
    cache.end(session, system, dirty=False, tools=tools)
    return cache


def test_the_same_session_system_and_tools_are_held_and_continued() -> None:
    cache = held_after("http-a", "house", TOOLS)
    assert cache.holds("http-a", "house", TOOLS)
    assert cache.begin("http-a", "house", TOOLS) is False  # continue: nothing to clear


def test_other_tools_are_another_conversation() -> None:
    cache = held_after("http-a", "house", TOOLS)
    assert not cache.holds("http-a", "house", None)
    assert not cache.holds("http-a", "house", "[]")
    assert cache.begin("http-a", "house", None) is True


def test_nothing_is_held_without_a_session_or_after_an_error() -> None:
    assert not held_after(None, "house", None).holds(None, "house", None)
    cache = KvCache()
    cache.begin("http-a", "house", TOOLS)
    cache.end("http-a", "house", dirty=True, tools=TOOLS)
    assert not cache.holds("http-a", "house", TOOLS)
    assert cache.begin("http-a", "house", TOOLS) is True
