"""Helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_topic(prefix: str = "test") -> str:
    """A topic level no other test (or earlier run against the same broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition`` comes true within ``timeout``, looked at every 10 ms: for state that notifies no one."""
    pause = threading.Event()
    for _ in range(int(timeout * 100)):
        if condition():
            return True
        pause.wait(0.01)
    return condition()


def serve_on_a_taken_port(*, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m rkllm_mqtt serve`` on its embedded defaults with the broker's port taken: it logs its start and
    exits. The environment is this one without RKLLM_MQTT_* settings and the variables named in ``unset``."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_") and k not in unset}
        environment["RKLLM_MQTT_MQTT__PORT"] = str(holder.getsockname()[1])
        return subprocess.run(
            [sys.executable, "-m", "rkllm_mqtt", "serve"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
