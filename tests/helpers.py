"""Helpers shared by the tests."""

from __future__ import annotations

import socket
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
