"""Nothing lost, nothing twice: a SIGKILLed daemon, a restarted broker, a killed cluster node (docs/reliability.md).

Mosquitto with persistence, the probe on a persistent MQTT 5 session, the daemon on a slow simulated runtime so
that a request is still running when the kill comes. Every wait is for a message or a log event, never for time:
after the restart a sentinel request (published last, answered last) says that everything before it is over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary
from .helpers import unique_topic

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

# 20 tokens at 20 a second: a request runs for about a second, long enough to be killed mid-run.
SLOW = "sim:rate=20,prefill_ms=0,tokens=20"
FAST = "sim:rate=0,prefill_ms=0,tokens=4"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def start_daemon(daemon: Daemon, probe: Probe) -> None:
    daemon.start()
    probe.wait_json(f"{daemon.root}/health", lambda h: h.get("runtime") == "ready" and h.get("started_at"), 60)


def kill(daemon: Daemon) -> None:
    """SIGKILL: no goodbye, no final for what is queued, no acknowledgement of anything unsettled."""
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(10)
    daemon.proc = None


def finals(probe: Probe, root: str) -> dict[str, list[Any]]:
    """Final responses by request id; the same bytes twice is MQTT's at-least-once, not a second answer."""
    by_id: dict[str, set[bytes]] = {}
    prefix = f"{root}/response/"
    for message in probe.on_prefix(prefix):
        rest = message.topic[len(prefix) :]
        if "/" not in rest:
            by_id.setdefault(rest, set()).add(message.payload)
    return {rid: [json.loads(p) for p in payloads] for rid, payloads in by_id.items()}


def request(rid: str, **fields: Any) -> str:
    return json.dumps({"id": rid, "prompt": "hello", **fields})


def sentinel_answered(probe: Probe, daemon: Daemon) -> None:
    """Publish one more request and wait for its final: whatever the daemon had before it is over."""
    rid = unique_topic("sentinel")
    probe.publish(f"{daemon.root}/prompt", request(rid, max_new_tokens=1))
    probe.wait_topic(f"{daemon.root}/response/{rid}", timeout=120)


def persistent_probe(port: int, root: str) -> Probe:
    probe = Probe(port, v5=True, persistent=True).start()
    probe.subscribe(f"{root}/response/#", f"{root}/health")
    return probe


def run_one_and_queue_the_rest(daemon: Daemon, probe: Probe, ids: list[str]) -> None:
    """Send a request for each id and wait until the first one runs and the others are queued."""
    for rid in ids:
        probe.publish(f"{daemon.root}/prompt", request(rid))
    probe.wait_topic(f"{daemon.root}/response/{ids[0]}/stream")  # the first one runs
    for rid in ids[1:]:
        probe.wait_json(f"{daemon.root}/response/{rid}/status", lambda s: s.get("status") == "queued")


def test_sigkill_with_one_running_and_a_full_queue_answers_each_request_once(tmp_path: Path, broker: Mosquitto) -> None:
    daemon = Daemon(
        tmp_path, broker.port, mqtt={"protocol": "5"}, runtime={"model_path": SLOW}, limits={"queue_size": 3}
    )
    probe = persistent_probe(broker.port, daemon.root)
    ids = [unique_topic("kill-a") for _ in range(4)]
    try:
        start_daemon(daemon, probe)
        run_one_and_queue_the_rest(daemon, probe, ids)
        assert ids[0] not in finals(probe, daemon.root), "the premise: the first request is still running"
        kill(daemon)
        start_daemon(daemon, probe)
        for rid in ids:
            probe.wait_topic(f"{daemon.root}/response/{rid}", timeout=120)
        sentinel_answered(probe, daemon)
        answered = finals(probe, daemon.root)
        for rid in ids:
            assert len(answered[rid]) == 1, (rid, answered[rid])
            assert answered[rid][0]["state"] == "done", answered[rid]
    finally:
        daemon.stop()
        probe.stop()


def test_sigkill_right_after_a_final_does_not_answer_it_again(tmp_path: Path, broker: Mosquitto) -> None:
    daemon = Daemon(tmp_path, broker.port, mqtt={"protocol": "5"}, runtime={"model_path": FAST})
    probe = persistent_probe(broker.port, daemon.root)
    try:
        start_daemon(daemon, probe)
        answered_ids = []
        for round_ in range(5):
            rid = unique_topic(f"kill-b{round_}")
            probe.publish(f"{daemon.root}/prompt", request(rid))
            probe.wait_topic(f"{daemon.root}/response/{rid}")
            kill(daemon)  # as soon as the final is seen: its prompt is most likely not acknowledged yet
            answered_ids.append(rid)
            start_daemon(daemon, probe)
        sentinel_answered(probe, daemon)
        answered = finals(probe, daemon.root)
        for rid in answered_ids:
            assert len(answered[rid]) == 1, (rid, answered[rid])
        redelivered = [e for e in daemon.logs() if e.get("event") == "request_redelivered"]
        assert all(e.get("outcome") == "answered before" for e in redelivered), redelivered
    finally:
        daemon.stop()
        probe.stop()


def test_broker_restart_with_a_full_queue_answers_each_request_once(tmp_path: Path, broker: Mosquitto) -> None:
    daemon = Daemon(
        tmp_path, broker.port, mqtt={"protocol": "5"}, runtime={"model_path": SLOW}, limits={"queue_size": 3}
    )
    probe = persistent_probe(broker.port, daemon.root)
    ids = [unique_topic("broker") for _ in range(4)]
    try:
        start_daemon(daemon, probe)
        run_one_and_queue_the_rest(daemon, probe, ids)
        broker.stop()
        broker.start()
        probe.connected.clear()
        for rid in ids:
            probe.wait_topic(f"{daemon.root}/response/{rid}", timeout=120)
        sentinel_answered(probe, daemon)
        answered = finals(probe, daemon.root)
        for rid in ids:
            assert len(answered[rid]) == 1, (rid, answered[rid])
            assert answered[rid][0]["state"] == "done", answered[rid]
    finally:
        daemon.stop()
        probe.stop()


@pytest.mark.timeout(300)
def test_killed_cluster_node_during_hand_offs_answers_each_group_request_once(
    tmp_path: Path, broker: Mosquitto
) -> None:
    group = unique_topic("group")
    base = unique_topic("base")
    mqtt = {"protocol": "5", "base_topic": base}
    cluster = {"enabled": True, "group": group}
    limits = {"response_topic_prefixes": [f"{base}/reply"], "queue_size": 8}
    victim, peer = (
        Daemon(tmp_path, broker.port, mqtt=mqtt, cluster=cluster, limits=limits, runtime={"model_path": SLOW})
        for _ in range(2)
    )
    probe = Probe(broker.port, v5=True, persistent=True).start()
    probe.subscribe(f"{base}/reply/#", *(f"{n.root}/health" for n in (victim, peer)), f"{peer.root}/state")
    ids = [unique_topic("group-req") for _ in range(8)]
    try:
        for node in (victim, peer):
            start_daemon(node, probe)
        probe.wait_json(f"{peer.root}/state", lambda s: s.get("status") == "idle")
        # The victim is busy with a request of its own, so group requests it receives are handed to the peer.
        busy = unique_topic("busy")
        probe.publish(f"{victim.root}/prompt", request(busy), response_topic=f"{base}/reply/{busy}")
        probe.wait_topic(f"{base}/reply/{busy}/stream")
        for rid in ids:
            probe.publish(f"{base}/prompt", request(rid), response_topic=f"{base}/reply/{rid}")
        wait_log(victim, "request_handed_off")
        kill(victim)  # in the middle of handing group requests on
        start_daemon(victim, probe)
        for rid in [*ids, busy]:
            probe.wait_topic(f"{base}/reply/{rid}", timeout=180)
        for node in (victim, peer):
            sentinel_answered_on(probe, node, base)
        for rid in [*ids, busy]:
            payloads = {m.payload for m in probe.on(f"{base}/reply/{rid}")}
            assert len(payloads) == 1, (rid, [json.loads(p) for p in payloads])
    finally:
        for node in (victim, peer):
            node.stop()
        probe.stop()


def wait_log(daemon: Daemon, event: str, timeout: float = 60.0) -> None:
    """Until the daemon has logged ``event`` (its log file is read as it grows)."""
    deadline = time.monotonic() + timeout
    while not any(e.get("event") == event for e in daemon.logs()):
        assert time.monotonic() < deadline, f"{daemon.node} never logged {event}"
        time.sleep(0.02)


def sentinel_answered_on(probe: Probe, daemon: Daemon, base: str) -> None:
    rid = unique_topic("sentinel")
    probe.publish(f"{daemon.root}/prompt", request(rid, max_new_tokens=1), response_topic=f"{base}/reply/{rid}")
    probe.wait_topic(f"{base}/reply/{rid}", timeout=120)
