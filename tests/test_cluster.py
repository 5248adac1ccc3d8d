"""Cluster mode on Mosquitto: group requests through a shared subscription, handed from a busy node to an idle one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkllm_mqtt.bridge.cluster import PeerTable
from rkllm_mqtt.topics import Topics

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary
from .helpers import unique_topic


def test_peer_table_picks_only_online_idle_peers() -> None:
    table = PeerTable(Topics("rkllm", "me"))
    assert table.observe("rkllm/a/availability", b"online")
    assert table.observe("rkllm/a/state", json.dumps({"status": "busy", "queue_depth": 0}).encode())
    assert table.observe("rkllm/b/state", json.dumps({"status": "idle", "queue_depth": 0}).encode())
    assert table.observe("rkllm/me/state", json.dumps({"status": "idle"}).encode()) is False
    assert not table.observe("rkllm/a/response/x", b"{}")
    assert table.pick_idle(now=0.0) is None, "b is idle but not known to be online"
    table.observe("rkllm/b/availability", b"online")
    assert table.pick_idle(now=0.0) == "b"
    assert table.pick_idle(now=1.0) is None, "b was just handed a request"
    table.observe("rkllm/b/state", json.dumps({"status": "busy"}).encode())
    table.observe("rkllm/b/state", json.dumps({"status": "idle", "queue_depth": 0}).encode())
    assert table.pick_idle(now=1.0) == "b"
    table.observe("rkllm/b/availability", b"offline")
    assert table.pick_idle(now=100.0) is None


def peer_is_idle(state: object) -> bool:
    """What PeerTable counts as an idle peer."""
    return isinstance(state, dict) and state.get("status") == "idle" and not state.get("queue_depth")


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_busy_node_hands_group_requests_to_an_idle_peer(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    probe = Probe(broker.port, v5=True).start()
    group = unique_topic("group")
    cluster = {"enabled": True, "group": group}
    base = unique_topic("base")
    mqtt = {"protocol": "5", "base_topic": base}
    limits = {"response_topic_prefixes": [f"{base}/reply"]}
    idle = Daemon(tmp_path, broker.port, mqtt=mqtt, cluster=cluster, limits=limits)
    # The hog runs until it is aborted, so the busy node stays busy however slowly the rest of the test goes.
    busy = Daemon(
        tmp_path,
        broker.port,
        mqtt=mqtt,
        cluster=cluster,
        limits=limits,
        runtime={"model_path": "sim:rate=20,prefill_ms=0,tokens=1000000"},
    )
    idle_state = f"{base}/{idle.node}/state"

    def idle_states() -> int:
        return sum(1 for m in probe.on(idle_state) if m.payload and peer_is_idle(m.json()))

    try:
        for daemon in (idle, busy):
            daemon.start()
        probe.subscribe(idle_state)
        for daemon in (idle, busy):
            probe.subscribe(f"{base}/{daemon.node}/health", f"{base}/{daemon.node}/availability")
            probe.wait_json(f"{base}/{daemon.node}/health", lambda h: h.get("runtime") == "ready", timeout=120)
        probe.wait_for(lambda msgs: any(m.payload == b"online" for m in probe.on(f"{base}/{idle.node}/availability")))
        reply = f"{base}/reply/{unique_topic('client')}"
        probe.subscribe(f"{reply}/#", reply)
        probe.publish(
            f"{base}/{busy.node}/prompt", json.dumps({"id": "hog", "prompt": "long", "response_topic": reply})
        )
        probe.wait_json(f"{reply}/status", lambda s: s["id"] == "hog" and s["status"] == "started", timeout=120)
        served = []
        for i in range(4):
            # The busy node learns of the idle one from the same broker, in the order the broker got the
            # messages: once the probe has seen the idle node's latest "idle" state, a request published now
            # reaches the busy node after that state did.
            probe.wait_for(lambda msgs: idle_states() > 0 and peer_is_idle(probe.on(idle_state)[-1].json()))
            idle_before = idle_states()
            request_id = f"group-{i}"
            probe.publish(
                f"{base}/prompt",
                json.dumps({"id": request_id, "prompt": "hi", "max_new_tokens": 4, "response_topic": reply}),
            )
            final = probe.wait_json(reply, lambda r, rid=request_id: r["id"] == rid, timeout=120)
            assert final["state"] == "done"
            served.append(final["node"])
            # The idle node says it is idle again only after its final answer; wait for that state.
            probe.wait_for(lambda msgs, before=idle_before: idle_states() > before, timeout=120)
        assert served == [idle.node] * 4
        handed = [e for e in busy.logs() if e.get("event") == "request_handed_off"]
        assert handed and all(e["peer"] == idle.node for e in handed)
    finally:
        for daemon in (idle, busy):
            daemon.stop()
        probe.stop()
        broker.stop()
