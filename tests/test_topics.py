"""Topic names of one node and of one request's replies (docs/topics.md)."""

from __future__ import annotations

from rkllm_mqtt.topics import ReplyTopics, Topics, is_under


def test_node_topics_live_under_base_and_node() -> None:
    topics = Topics("rkllm", "kitchen")
    assert topics.root == "rkllm/kitchen"
    assert (topics.prompt, topics.abort, topics.clear) == (
        "rkllm/kitchen/prompt",
        "rkllm/kitchen/abort",
        "rkllm/kitchen/clear",
    )
    assert (topics.state, topics.health, topics.model) == (
        "rkllm/kitchen/state",
        "rkllm/kitchen/health",
        "rkllm/kitchen/model",
    )
    assert (topics.error, topics.last, topics.event) == (
        "rkllm/kitchen/error",
        "rkllm/kitchen/last",
        "rkllm/kitchen/event",
    )
    assert topics.availability == "rkllm/kitchen/availability"
    assert topics.response("q1") == "rkllm/kitchen/response/q1"
    assert len(set(topics.fixed())) == len(topics.fixed()) == 10
    assert all(is_under(topic, topics.root) for topic in topics.fixed())


def test_group_topics_are_shared_by_every_node_of_the_base() -> None:
    topics = Topics("site/llm", "a")
    assert topics.group_prompt == "site/llm/prompt"
    assert topics.shared_group_prompt("g1") == "$share/g1/site/llm/prompt"


def test_a_reply_goes_to_the_final_topic_and_two_levels_below_it() -> None:
    reply = ReplyTopics("rkllm/reply/me")
    assert (reply.final, reply.stream, reply.status) == (
        "rkllm/reply/me",
        "rkllm/reply/me/stream",
        "rkllm/reply/me/status",
    )


def test_is_under_matches_whole_levels_only() -> None:
    assert is_under("rkllm/reply", "rkllm/reply")
    assert is_under("rkllm/reply/x/y", "rkllm/reply/")
    assert not is_under("rkllm/replyx", "rkllm/reply")
    assert not is_under("rkllm", "rkllm/reply")
