"""Who owns the runtime's one KV cache, and when it must be cleared before a run (docs/runtime.md)."""

from __future__ import annotations

from rkllm_mqtt.runtime.kvcache import KvCache


def test_a_session_continues_only_with_the_same_system_prompt() -> None:
    kv = KvCache()
    assert kv.begin("kitchen", None) is False  # empty cache: nothing to clear
    kv.end("kitchen", None, dirty=False)
    assert kv.owner == "kitchen"
    assert kv.begin("kitchen", None) is False  # the same conversation goes on
    kv.end("kitchen", None, dirty=False)
    assert kv.begin("kitchen", "You are a kettle.") is True  # its system prompt changed
    kv.end("kitchen", "You are a kettle.", dirty=False)
    assert kv.begin("garage", "You are a kettle.") is True  # another conversation
    kv.end(None, None, dirty=False)
    assert kv.owner is None
    assert kv.begin(None, None) is False  # the last run kept no history


def test_an_unknown_cache_is_cleared_before_the_next_run() -> None:
    kv = KvCache()
    kv.begin("kitchen", None)
    kv.end("kitchen", None, dirty=True)
    assert kv.owner is None
    assert kv.begin("kitchen", None) is True


def test_forget_while_idle_and_while_running() -> None:
    kv = KvCache()
    kv.begin("kitchen", None)
    kv.end("kitchen", None, dirty=False)
    assert kv.forget("garage") is False  # not held
    assert kv.forget("kitchen") is True
    assert kv.begin("kitchen", None) is True
    # During a run the turn completes, then the cache is marked to be cleared.
    assert kv.forget(None) is False  # dirty: nothing known is held
    kv.end("kitchen", None, dirty=False)
    kv.begin("kitchen", None)
    assert kv.forget(None) is True
    kv.end("kitchen", None, dirty=False)
    assert kv.begin("kitchen", None) is True


def test_a_new_worker_starts_empty() -> None:
    kv = KvCache()
    kv.begin("kitchen", None)
    kv.end("kitchen", None, dirty=True)
    kv.reset()
    assert kv.owner is None
    assert kv.begin("kitchen", None) is False
