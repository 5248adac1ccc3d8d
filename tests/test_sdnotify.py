"""SystemdNotifier against a real AF_UNIX datagram socket owned by the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rkllm_mqtt.sdnotify import SystemdNotifier


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60.0)  # a safety net only: every datagram is sent before it is read
    try:
        yield str(path), sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"rkllm-mqtt-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(60.0)  # a safety net only: every datagram is sent before it is read
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


@pytest.mark.parametrize("fixture", ["path_socket", "abstract_socket"])
def test_messages_arrive_exactly(fixture: str, request: pytest.FixtureRequest) -> None:
    address, sock = request.getfixturevalue(fixture)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    with SystemdNotifier.from_env(env) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert _received(sock) == "READY=1"
        assert notifier.status("connected to broker, runtime loading")
        assert _received(sock) == "STATUS=connected to broker, runtime loading"
        assert notifier.watchdog()
        assert _received(sock) == "WATCHDOG=1"
        assert notifier.stopping()
        assert _received(sock) == "STOPPING=1"
        assert notifier.ready(status="ready")
        assert _received(sock) == "READY=1\nSTATUS=ready"


def test_status_newlines_do_not_inject_fields(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = SystemdNotifier(address)
    try:
        notifier.status("line one\nREADY=1")
        assert _received(sock) == "STATUS=line one READY=1"
    finally:
        notifier.close()


def test_reloading_and_extend_timeout(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with SystemdNotifier(address) as notifier:
        notifier.reloading()
        lines = _received(sock).split("\n")
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=", 1)[1]) > 0
        notifier.extend_timeout(2.5)
        assert _received(sock) == "EXTEND_TIMEOUT_USEC=2500000"


def test_from_env_removes_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "1"}
    notifier = SystemdNotifier.from_env(env)
    assert notifier.address == "@x"
    assert env == {"OTHER": "1"}
    kept = {"NOTIFY_SOCKET": "@x"}
    SystemdNotifier.from_env(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": "@x"}


def test_child_process_does_not_inherit_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@rkllm-mqtt-test-unused")
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    SystemdNotifier.from_env()
    assert "NOTIFY_SOCKET" not in os.environ
    code = "import os; print(os.environ.get('NOTIFY_SOCKET'), os.environ.get('WATCHDOG_USEC'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None None"


def test_without_socket_every_call_is_a_quiet_no_op() -> None:
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    with capture_logs() as logs:
        notifier.open()
        assert notifier.ready() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        assert notifier.notify(READY=1) is False
        notifier.close()
    assert logs == []


def test_vanished_socket_warns_once_and_never_raises(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"), watchdog_usec=2_000_000)
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status("still no") is False
    notifier.close()
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["address"] == str(tmp_path / "gone.sock")


def test_unsupported_address_is_disabled_with_one_warning() -> None:
    notifier = SystemdNotifier("vsock:2:1234")
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["sd_notify_unavailable"]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("500000", "self", 0.25),
        ("30000000", "other", None),
        ("0", None, None),
        ("not-a-number", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "@rkllm-mqtt-test-unused"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    notifier = SystemdNotifier.from_env(env)
    assert notifier.watchdog_interval() == expected
    assert notifier.watchdog_enabled is (expected is not None)


def test_watchdog_for_another_process_sends_nothing(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with SystemdNotifier.from_env(env) as notifier:
        assert notifier.watchdog() is False
        assert notifier.status("after") is True
        # The first datagram to arrive is the status: no WATCHDOG=1 was sent before it.
        assert _received(sock) == "STATUS=after"


def test_watchdog_without_watchdog_usec_sends_nothing(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with SystemdNotifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.watchdog() is False
        notifier.stopping()
        assert _received(sock) == "STOPPING=1"
