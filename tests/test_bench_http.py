"""The HTTP-path benchmark script stays importable and configures its daemon with the API on (no timing here)."""

from __future__ import annotations

from pathlib import Path

from bench.http_path import TURNS, ApiDaemon


def test_bench_daemon_serves_the_api_on_its_own_port(tmp_path: Path) -> None:
    daemon = ApiDaemon(tmp_path, 1883, model="sim:", label="smoke")
    api = daemon.config()["api"]
    assert api == {"enabled": True, "host": "127.0.0.1", "port": daemon.api_port}
    assert daemon.url == f"http://127.0.0.1:{daemon.api_port}"
    assert len(TURNS) == 5
