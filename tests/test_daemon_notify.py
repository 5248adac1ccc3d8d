"""The daemon's systemd notifications, received on a socket the test provides."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Probe, wait_ready


def receive_all(sock: socket.socket, until: float) -> list[str]:
    messages: list[str] = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        messages.append(data.decode())
    return messages


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    amqtt_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    probe = Probe(amqtt_broker.port).start()
    daemon = Daemon(tmp_path, amqtt_broker.port)
    try:
        daemon.start(extra_env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "600000"})
        wait_ready(probe, daemon)
        messages = receive_all(sock, time.monotonic() + 3.0)
        ready = [m for m in messages if "READY=1" in m.split("\n")]
        assert len(ready) == 1, messages
        statuses = [line for m in messages for line in m.split("\n") if line.startswith("STATUS=")]
        assert any("connected to 127.0.0.1" in s and "runtime ready (simulated, abi 1.3)" in s for s in statuses)
        pings = [m for m in messages if m == "WATCHDOG=1"]
        assert len(pings) >= 3, "the watchdog must be pinged every half interval while healthy"
        probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "n1", "prompt": "x"}))
        probe.subscribe(f"{daemon.root}/response/n1")
        probe.wait_topic(f"{daemon.root}/response/n1")
        assert daemon.stop() == 0
        after = receive_all(sock, time.monotonic() + 1.0)
        assert any("STOPPING=1" in m.split("\n") for m in after), after
        worker_logs = [e for e in daemon.logs() if e.get("event") == "sd_notify_failed"]
        assert not worker_logs
    finally:
        daemon.stop()
        probe.stop()
        sock.close()


def test_without_notify_socket_the_daemon_runs_normally(amqtt_broker: EmbeddedBroker, tmp_path: Path) -> None:
    probe = Probe(amqtt_broker.port).start()
    daemon = Daemon(tmp_path, amqtt_broker.port)
    try:
        daemon.start()
        wait_ready(probe, daemon)
        assert daemon.stop() == 0
        assert not [e for e in daemon.logs() if str(e.get("event", "")).startswith("sd_notify")]
    finally:
        daemon.stop()
        probe.stop()
