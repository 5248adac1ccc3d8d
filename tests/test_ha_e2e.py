"""Home Assistant discovery as the daemon publishes it, on a real broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready
from .helpers import unique_topic

ENTITY_COUNT = 16


def configs(probe: Probe, prefix: str, node: str) -> dict[str, bytes]:
    """The latest payload seen on each of this node's config topics."""
    latest: dict[str, bytes] = {}
    for message in probe.messages:
        parts = message.topic.split("/")
        if len(parts) == 5 and parts[0] == prefix and parts[2] == node and parts[4] == "config":
            latest[message.topic] = message.payload
    return latest


def test_discovery_is_published_reannounced_and_stale_configs_cleared(
    amqtt_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    prefix = unique_topic("ha")
    node = unique_topic("node")
    probe = Probe(amqtt_broker.port).start()
    daemon: Daemon | None = None
    try:
        probe.subscribe(f"{prefix}/#")
        stale = f"{prefix}/sensor/{node}/old_entity/config"
        foreign = f"{prefix}/sensor/other-node/old_entity/config"
        probe.publish(stale, json.dumps({"name": "old"}), retain=True)
        probe.publish(foreign, json.dumps({"name": "not ours"}), retain=True)
        daemon = Daemon(
            tmp_path,
            amqtt_broker.port,
            node=node,
            homeassistant={"discovery_prefix": prefix, "status_topic": f"{prefix}/status", "enabled": True},
        ).start()
        wait_ready(probe, daemon)

        def announced() -> dict[str, Any]:
            return {t: json.loads(p) for t, p in configs(probe, prefix, node).items() if p and t != stale}

        # Discovery may go out before the runtime has loaded (model "unknown") and again once it says what it
        # runs; on a slow machine the second round can come after health says ready, so wait for it.
        probe.wait_for(
            lambda msgs: (
                len(announced()) >= ENTITY_COUNT
                and all(c["device"]["model"] == "simulated" for c in announced().values())
            ),
            timeout=120,
        )
        probe.wait_for(lambda msgs: configs(probe, prefix, node).get(stale) == b"", timeout=120)
        assert not [m for m in probe.on(foreign) if m.payload == b""], "another node's config must be left alone"
        published = announced()
        assert len(published) == ENTITY_COUNT
        assert {c["device"]["model"] for c in published.values()} == {"simulated"}
        for config in published.values():
            assert config["availability"][0]["topic"] == f"rkllm/{node}/availability"
        before = len([m for m in probe.messages if m.topic.startswith(f"{prefix}/text/{node}/")])
        probe.publish(f"{prefix}/status", "online")
        probe.wait_for(
            lambda msgs: len([m for m in msgs if m.topic.startswith(f"{prefix}/text/{node}/")]) > before, timeout=120
        )
        probe.subscribe(f"rkllm/{node}/event")
        probe.publish(f"rkllm/{node}/prompt", "Hello from the text entity")
        event = probe.wait_json(f"rkllm/{node}/event", lambda e: True)
        assert event["event_type"] == "done" and "Hello from the text entity" in event["text"]
    finally:
        if daemon is not None:
            daemon.stop()
        probe.publish(foreign, b"", retain=True)
        probe.stop()


def test_disabled_discovery_removes_the_device(amqtt_broker: EmbeddedBroker, tmp_path: Path) -> None:
    prefix = unique_topic("ha")
    node = unique_topic("node")
    probe = Probe(amqtt_broker.port).start()
    first = Daemon(tmp_path, amqtt_broker.port, node=node, homeassistant={"discovery_prefix": prefix, "enabled": True})
    second = Daemon(
        tmp_path, amqtt_broker.port, node=node, homeassistant={"discovery_prefix": prefix, "enabled": False}
    )
    try:
        probe.subscribe(f"{prefix}/#")
        first.start()
        wait_ready(probe, first)
        probe.wait_for(lambda msgs: len([p for p in configs(probe, prefix, node).values() if p]) >= ENTITY_COUNT)
        first.stop()
        second.start()
        probe.wait_for(lambda msgs: all(p == b"" for p in configs(probe, prefix, node).values()), timeout=120)
        assert len(configs(probe, prefix, node)) == ENTITY_COUNT
    finally:
        first.stop()
        second.stop()
        probe.stop()


def _proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads threads and memory from /proc")
def test_a_storm_of_births_costs_no_threads_and_delays_no_request(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    prefix = unique_topic("ha")
    node = unique_topic("node")
    probe = Probe(broker.port).start()
    daemon = Daemon(
        tmp_path,
        broker.port,
        node=node,
        homeassistant={"discovery_prefix": prefix, "status_topic": f"{prefix}/status", "enabled": True},
    )
    try:
        probe.subscribe(f"{prefix}/#", f"rkllm/{node}/response/#")
        daemon.start()
        wait_ready(probe, daemon)
        probe.wait_for(lambda msgs: len([p for p in configs(probe, prefix, node).values() if p]) >= ENTITY_COUNT)
        assert daemon.proc is not None
        before = _proc_status(daemon.proc.pid)
        assert probe.client is not None
        for _ in range(5000):
            probe.client.publish(f"{prefix}/status", b"online", qos=0)
        # The sentinel: published after every birth, so it is answered only after the daemon has taken them all in.
        probe.publish(f"rkllm/{node}/prompt", json.dumps({"id": "after-storm", "prompt": "x", "max_new_tokens": 2}))
        final = probe.wait_json(f"rkllm/{node}/response/after-storm", lambda r: True, timeout=120)
        assert final["state"] == "done"
        after = _proc_status(daemon.proc.pid)
        assert int(after["Threads"]) <= int(before["Threads"]) + 2, "no thread per birth"
        grown_kb = int(after["VmRSS"].split()[0]) - int(before["VmRSS"].split()[0])
        assert grown_kb < 8 * 1024, f"RSS grew by {grown_kb} kB"
        # Discovery is announced again (once per burst), not once per birth.
        probe.wait_for(
            lambda msgs: (
                len([m for m in msgs if m.topic.startswith(f"{prefix}/") and m.topic.endswith("/config")])
                >= 2 * ENTITY_COUNT
            ),
            timeout=120,
        )
        announced = len([m for m in probe.messages if m.topic.startswith(f"{prefix}/") and m.topic.endswith("/config")])
        assert announced < 5000, "not one re-announce per birth"
    finally:
        daemon.stop()
        probe.stop()
        broker.stop()
