"""Broker logins: a password file, and a refused login retried with backoff, never in a tight loop."""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from rkllm_mqtt.bridge.transport import RECONNECT_MIN_S

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


def test_password_file_logs_in_and_serves(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"bridge": "s3cret", "tester": "t"})
    broker.start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")  # the trailing newline is not part of the password
    probe = Probe(broker.port, auth=("tester", "t")).start()
    daemon = Daemon(tmp_path, broker.port, mqtt={"username": "bridge", "password_file": str(secret)}).start()
    try:
        wait_ready(probe, daemon)
        probe.subscribe(f"{daemon.root}/response/#")
        probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "auth-1", "prompt": "x"}))
        assert probe.wait_json(f"{daemon.root}/response/auth-1", lambda r: True)["state"] == "done"
    finally:
        daemon.stop()
        probe.stop()
        broker.stop()


def refused_attempts(daemon: Daemon) -> list[datetime]:
    """When the daemon logged each refused login, in order."""
    return [
        datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        for e in daemon.logs()
        # The daemon's second connection (abort/clear, "-ctl") retries on its own schedule.
        if e.get("event") == "mqtt_connect_refused" and not str(e.get("client_id", "")).endswith("-ctl")
    ]


def test_refused_login_is_retried_with_backoff(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"bridge": "right"})
    broker.start()
    daemon = Daemon(tmp_path, broker.port, mqtt={"username": "bridge", "password": "wrong"}).start()
    try:
        # Wait for the attempts themselves, however long a slow machine takes to make them.
        deadline = time.monotonic() + 300
        while len(refused_attempts(daemon)) < 3 and time.monotonic() < deadline:
            assert daemon.proc is not None and daemon.proc.poll() is None, "a refused login must not stop the daemon"
            time.sleep(0.1)
        attempts = refused_attempts(daemon)
        assert len(attempts) >= 3, f"only {len(attempts)} refused logins were logged"
        assert daemon.proc is not None and daemon.proc.poll() is None, "a refused login must not stop the daemon"
        # Only lower bounds: a slower machine makes the gaps longer, never shorter. The backoff starts at
        # RECONNECT_MIN_S and doubles, so a tight loop (or a fixed delay) fails the second bound.
        gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(attempts[:3])]
        assert gaps[0] >= 0.9 * RECONNECT_MIN_S, f"retried after {gaps[0]:.2f} s, before the first backoff"
        assert gaps[1] >= 1.9 * RECONNECT_MIN_S, f"second retry after {gaps[1]:.2f} s: the backoff did not grow"
        refused = [e for e in daemon.logs() if e.get("event") == "mqtt_connect_refused"]
        assert "password" in refused[0]["hint"]
    finally:
        assert daemon.stop() == 0
        broker.stop()
