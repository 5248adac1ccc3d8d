"""doctor's check of the Ollama API settings: off, free port, exposed, taken by another program, already served."""

from __future__ import annotations

import socket

from rkllm_mqtt.api.preflight import check_api
from rkllm_mqtt.api.server import ApiServer
from rkllm_mqtt.core.scheduler import Scheduler
from rkllm_mqtt.settings import Settings

from .helpers import free_port
from .test_api_http import FakeRuntime


def test_off_is_skipped() -> None:
    assert check_api(Settings()).status == "SKIP"


def test_free_loopback_port_passes_and_an_exposed_one_warns() -> None:
    port = free_port()
    local = check_api(Settings(api={"enabled": True, "port": port}))
    assert local.status == "PASS" and "free" in local.detail and "loopback" in local.detail
    exposed = check_api(Settings(api={"enabled": True, "host": "0.0.0.0", "port": port}))
    assert exposed.status == "WARN" and "WITHOUT a token" in exposed.detail
    assert exposed.hint is not None and "api.token" in exposed.hint
    with_token = check_api(Settings(api={"enabled": True, "host": "0.0.0.0", "port": port, "token": "t"}))
    assert with_token.status == "WARN" and "with a bearer token" in with_token.detail


def test_port_taken_by_another_program_fails() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = check_api(Settings(api={"enabled": True, "port": port}))
    assert result.status == "FAIL" and "taken" in result.detail
    assert result.hint is not None and "api.port" in result.hint


def test_a_running_bridge_on_the_port_is_recognised_even_behind_a_token() -> None:
    runtime = FakeRuntime()
    settings = Settings(api={"enabled": True, "port": free_port(), "token": "secret"})
    server = ApiServer(settings, Scheduler(runtime, queue_size=1, hang_grace_s=1.0), runtime)
    server.start()
    try:
        result = check_api(settings)
    finally:
        server.stop()
    assert result.status == "PASS" and "rkllm-mqtt answers there" in result.detail
