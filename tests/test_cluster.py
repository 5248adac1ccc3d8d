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
    # The hog runs until the daemon stops, so the busy node stays busy however slowly the rest of the test goes.
    busy = Daemon(
        tmp_path,
        broker.port,
        mqtt=mqtt,
        cluster=cluster,
        limits=limits,
        runtime={"model_path": "sim:rate=20,prefill_ms=0,tokens=1000000"},
    )
    try:
        for daemon in (idle, busy):
            daemon.start()
        for daemon in (idle, busy):
            probe.subscribe(f"{base}/{daemon.node}/health", f"{base}/{daemon.node}/availability")
            probe.wait_json(f"{base}/{daemon.node}/health", lambda h: h.get("runtime") == "ready", timeout=120)
        reply = f"{base}/reply/{unique_topic('client')}"
        probe.subscribe(f"{reply}/#", reply)
        probe.publish(
            f"{base}/{busy.node}/prompt", json.dumps({"id": "hog", "prompt": "long", "response_topic": reply})
        )
        probe.wait_json(f"{reply}/status", lambda s: s["id"] == "hog" and s["status"] == "started", timeout=120)
        # Barrier: the busy node hears the idle node's state before any group request the probe sends after
        # seeing it (the broker delivers to it in the order it received them).
        idle_state = f"{base}/{idle.node}/state"
        probe.subscribe(idle_state)
        probe.wait_json(idle_state, lambda s: s["status"] == "idle")
        served = []
        for i in range(4):
            request_id = f"group-{i}"
            probe.publish(
                f"{base}/prompt",
                json.dumps({"id": request_id, "prompt": "hi", "max_new_tokens": 4, "response_topic": reply}),
            )
            final = probe.wait_json(reply, lambda r, rid=request_id: r["id"] == rid, timeout=120)
            assert final["state"] == "done"
            served.append(final["node"])
            probe.wait_json(
                idle_state, lambda s, n=i + 1: s["status"] == "idle" and s["requests_total"] == n, timeout=120
            )
        assert served == [idle.node] * 4
        handed = [e for e in busy.logs() if e.get("event") == "request_handed_off"]
        assert handed and all(e["peer"] == idle.node for e in handed)
    finally:
        for daemon in (idle, busy):
            daemon.stop()
        probe.stop()
        broker.stop()
