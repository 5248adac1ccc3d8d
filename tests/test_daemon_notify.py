"""The daemon's systemd notifications, received on a socket the test provides."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Probe, wait_ready


class NotifyListener:
    """The notify socket systemd would hold, read from the start by a thread.

    The kernel queues only a few datagrams on an unread AF_UNIX socket (net.unix.max_dgram_qlen, often 10) before
    the daemon's sends time out, so the socket is drained all the time, not only when the test looks.
    """

    def __init__(self, address: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(address))
        self.sock.settimeout(0.2)  # how often the reader looks at the stop flag
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)

    def start(self) -> NotifyListener:
        self.thread.start()
        return self

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self.cond:
                self.messages.append(data.decode())
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 120.0) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.messages), timeout), self.messages
            return list(self.messages)

    def stop(self) -> list[str]:
        self.stopping.set()
        self.thread.join()
        self.sock.close()
        return list(self.messages)


def lines(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.split("\n")]


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    amqtt_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    address = tmp_path / "notify.sock"
    listener = NotifyListener(address).start()
    probe = Probe(amqtt_broker.port).start()
    daemon = Daemon(tmp_path, amqtt_broker.port)
    try:
        daemon.start(extra_env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "600000"})
        wait_ready(probe, daemon)

        def settled(messages: list[str]) -> bool:
            statuses = [line for line in lines(messages) if line.startswith("STATUS=")]
            ready_status = any(
                "connected to 127.0.0.1" in s and "runtime ready (simulated, abi 1.3)" in s for s in statuses
            )
            # Three pings: the watchdog is pinged again and again while healthy, not once.
            return "READY=1" in lines(messages) and ready_status and messages.count("WATCHDOG=1") >= 3

        listener.wait_for(settled)
        probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "n1", "prompt": "x"}))
        probe.subscribe(f"{daemon.root}/response/n1")
        probe.wait_topic(f"{daemon.root}/response/n1")
        assert daemon.stop() == 0
        # The daemon has exited: everything it sent is in the socket's queue.
        listener.wait_for(lambda messages: "STOPPING=1" in lines(messages))
        messages = listener.stop()
        assert lines(messages).count("READY=1") == 1, messages
        assert not [e for e in daemon.logs() if e.get("event") == "sd_notify_failed"]
    finally:
        daemon.stop()
        probe.stop()
        if not listener.stopping.is_set():
            listener.stop()


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
