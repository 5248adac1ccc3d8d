"""The importable Node-RED flow in docs/: broker, topics and wiring agree with the bridge's contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt.payloads import ID_PATTERN
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import ReplyTopics, Topics, is_under

FLOW_PATH = Path(__file__).resolve().parent.parent / "docs" / "node-red" / "flow.json"
DOC_PATH = FLOW_PATH.parent.parent / "node-red.md"
# The node id the flow and docs/node-red.md use; the user replaces it with their own.
DOCUMENTED_NODE_ID = "mynode"

Node = dict[str, Any]


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` this level and everything below)."""
    f_levels = filter_.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return index == len(f_levels) - 1
        if index >= len(t_levels):
            return False
        if level not in ("+", t_levels[index]):
            return False
    return len(f_levels) == len(t_levels)


def test_topic_matcher_itself() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert not topic_matches("a/+", "a/b/c")
    assert topic_matches("a/#", "a")
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/b", "a/b/c")


@pytest.fixture(scope="module")
def flow() -> list[Node]:
    data = json.loads(FLOW_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


@pytest.fixture(scope="module")
def nodes(flow: list[Node]) -> dict[str, Node]:
    by_id = {node["id"]: node for node in flow}
    assert len(by_id) == len(flow), "node ids must be unique"
    return by_id


def one(flow: list[Node], node_type: str, **match: Any) -> Node:
    found = [n for n in flow if n["type"] == node_type and all(n.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (node_type, match, found)
    return found[0]


def reply_topic(flow: list[Node]) -> str:
    topic = one(flow, "mqtt out")["respTopic"]
    assert isinstance(topic, str) and topic
    return topic


def downstream(nodes: dict[str, Node], start: str) -> dict[str, list[str]]:
    """Every node reachable from ``start``, with the path of node types that leads to it."""
    paths = {start: [nodes[start]["type"]]}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for output in nodes[current].get("wires", []):
            for target in output:
                if target not in paths:
                    paths[target] = [*paths[current], nodes[target]["type"]]
                    queue.append(target)
    return paths


def test_every_wire_and_reference_points_at_an_existing_node(flow: list[Node], nodes: dict[str, Node]) -> None:
    tabs = {n["id"] for n in flow if n["type"] == "tab"}
    assert len(tabs) == 1
    for node in flow:
        for output in node.get("wires", []):
            for target in output:
                assert target in nodes, (node["id"], target)
                assert target != node["id"]
        if "broker" in node and node["type"] != "mqtt-broker":
            assert nodes[node["broker"]]["type"] == "mqtt-broker"
        if node["type"] not in ("tab", "mqtt-broker"):
            assert node["z"] in tabs


def test_broker_node_is_localhost_1883_mqtt5(flow: list[Node]) -> None:
    broker = one(flow, "mqtt-broker")
    assert broker["broker"] in ("localhost", "127.0.0.1")
    assert int(broker["port"]) == 1883
    # The editor stores the protocol as the string "5" and compares it strictly.
    assert broker["protocolVersion"] == "5"
    assert broker["usetls"] is False
    # No credentials are shipped in the flow file.
    assert "credentials" not in broker


def test_prompt_goes_to_the_daemons_prompt_topic_with_an_allowed_reply_topic(flow: list[Node]) -> None:
    settings = Settings()
    out = one(flow, "mqtt out")
    assert out["topic"] == Topics(settings.mqtt.base_topic, DOCUMENTED_NODE_ID).prompt
    assert str(out["qos"]) == "1"
    assert out["retain"] in ("false", False)
    reply = reply_topic(flow)
    assert any(is_under(reply, prefix) for prefix in settings.reply_prefixes())
    assert not any(ch in reply for ch in "+#") and not reply.startswith("$")
    assert not is_under(reply, settings.homeassistant.discovery_prefix)
    # Replies do not depend on the node id: only the prompt topic has to be edited.
    assert DOCUMENTED_NODE_ID not in reply


def test_request_body_carries_the_same_reply_topic_for_mqtt_311(flow: list[Node]) -> None:
    function = one(flow, "function")
    found = re.findall(r"response_topic:\s*\"([^\"]+)\"", function["func"])
    assert found == [reply_topic(flow)]


def test_mqtt_in_nodes_subscribe_to_what_the_daemon_publishes_for_the_reply_topic(flow: list[Node]) -> None:
    reply = ReplyTopics(reply_topic(flow))
    ins = [n for n in flow if n["type"] == "mqtt in"]
    assert len(ins) == 2
    stream_in = [n for n in ins if topic_matches(n["topic"], reply.stream)]
    final_in = [n for n in ins if topic_matches(n["topic"], reply.final)]
    assert len(stream_in) == 1 and len(final_in) == 1
    assert stream_in[0] is not final_in[0]
    # Each sees only its own kind of message, and neither sees the status messages.
    assert not topic_matches(stream_in[0]["topic"], reply.final)
    assert not topic_matches(final_in[0]["topic"], reply.stream)
    for node in ins:
        assert not topic_matches(node["topic"], reply.status)
        assert node["datatype"] == "json"
    # The flow subscribes before it asks: the retained copy of an earlier final (kept for late subscribers) would
    # only come back as a duplicate on every deploy. MQTT 5 retain handling 2: no retained messages on subscribe.
    assert final_in[0]["rh"] == 2


def test_wiring_inject_to_mqtt_out_and_mqtt_in_to_join_to_debug(flow: list[Node], nodes: dict[str, Node]) -> None:
    inject = one(flow, "inject")
    out = one(flow, "mqtt out")
    assert out["id"] in downstream(nodes, inject["id"])
    assert downstream(nodes, inject["id"])[out["id"]][-1] == "mqtt out"

    reply = ReplyTopics(reply_topic(flow))
    join = one(flow, "join")
    stream_in = next(n for n in flow if n["type"] == "mqtt in" and topic_matches(n["topic"], reply.stream))
    final_in = next(n for n in flow if n["type"] == "mqtt in" and topic_matches(n["topic"], reply.final))
    from_stream = downstream(nodes, stream_in["id"])
    assert join["id"] in from_stream
    debug_after_join = [i for i in downstream(nodes, join["id"]) if nodes[i]["type"] == "debug"]
    assert debug_after_join
    assert from_stream[debug_after_join[0]][0] == "mqtt in"
    assert "join" in from_stream[debug_after_join[0]]
    # The final response ends the joined stream, and is shown on its own too.
    from_final = downstream(nodes, final_in["id"])
    assert join["id"] in from_final
    assert any(nodes[t]["type"] == "debug" for output in final_in["wires"] for t in output)


def test_join_collects_chunk_texts_and_completes_on_the_final_response(
    flow: list[Node], nodes: dict[str, Node]
) -> None:
    join = one(flow, "join")
    assert join["mode"] == "custom"
    assert join["build"] == "string"
    assert join["joiner"] == ""
    # Chunks reach the join as their text alone, grouped by request id so overlapping requests
    # are not mixed (a manual join keeps msg.parts only with useparts).
    chunk = one(flow, "change", name="chunk text")
    set_id = {"t": "set", "p": "parts.id", "pt": "msg", "to": "payload.id", "tot": "msg"}
    assert chunk["rules"] == [
        set_id,
        {"t": "set", "p": "payload", "pt": "msg", "to": "payload.text", "tot": "msg"},
    ]
    assert join["property"] == "payload"
    assert join["useparts"] is True
    assert join["count"] == ""
    # The final response keeps its object in msg.final, drops its payload (so it adds no text)
    # and sets msg.complete, which makes a manual join send what it has.
    end = one(flow, "change", name="end of stream")
    assert end["rules"][0] == set_id
    assert {"t": "set", "p": "complete", "pt": "msg", "to": "true", "tot": "bool"} in end["rules"]
    assert {"t": "delete", "p": "payload", "pt": "msg"} in end["rules"]
    assert end["rules"].index({"t": "delete", "p": "payload", "pt": "msg"}) > 0
    assert [join["id"]] in end["wires"]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_function_node_builds_a_valid_request() -> None:
    flow = json.loads(FLOW_PATH.read_text(encoding="utf-8"))
    function = one(flow, "function")
    script = (
        "const msg = {payload: 'What is MQTT?'};\n"
        f"const result = (function(msg) {{\n{function['func']}\n}})(msg);\n"
        "process.stdout.write(JSON.stringify(result.payload));\n"
    )
    completed = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True, timeout=300)
    request = json.loads(completed.stdout)
    assert request["prompt"] == "What is MQTT?"
    assert re.match(ID_PATTERN, request["id"])
    assert request["response_topic"] == reply_topic(flow)


def test_the_doc_names_the_same_topics_and_node_id(flow: list[Node]) -> None:
    doc = DOC_PATH.read_text(encoding="utf-8")
    assert one(flow, "mqtt out")["topic"] in doc
    assert reply_topic(flow) in doc
    assert f"`{DOCUMENTED_NODE_ID}`" in doc
