"""Broker logins: a password file, and a refused login retried with backoff, never in a tight loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

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


def test_refused_login_is_retried_with_backoff(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"bridge": "right"})
    broker.start()
    daemon = Daemon(tmp_path, broker.port, mqtt={"username": "bridge", "password": "wrong"}).start()
    try:
        time.sleep(8.0)
        assert daemon.proc is not None and daemon.proc.poll() is None, "a refused login must not stop the daemon"
        refused = [
            e
            for e in daemon.logs()
            # The daemon's second connection (abort/clear, "-ctl") retries on its own schedule.
            if e.get("event") == "mqtt_connect_refused" and not str(e.get("client_id", "")).endswith("-ctl")
        ]
        assert 2 <= len(refused) <= 5, f"{len(refused)} attempts in 8 s: expected a growing backoff from 1 s"
        assert "password" in refused[0]["hint"]
    finally:
        assert daemon.stop() == 0
        broker.stop()
