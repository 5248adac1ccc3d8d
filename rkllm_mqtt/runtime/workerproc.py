"""Starting the worker process, and the parent's handle on one running worker.

The worker must import exactly the package the daemon imported, whatever the current directory: started as
``python -m rkllm_mqtt.runtime.worker``, a source tree in the working directory would shadow the installed
package (whose built simulated runtime exists only where it was installed). So the interpreter runs isolated
(``-I``: neither the working directory nor ``PYTHON*`` variables) and is handed the daemon's own ``sys.path``.

It also gets only the environment it needs: the process that loads the vendor library sees no
``RKLLM_MQTT_*`` variable (they may hold the broker password), no ``NOTIFY_SOCKET`` (only the daemon talks to
systemd) and nothing else the daemon happens to carry.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rkllm_mqtt.runtime.protocol import EventReader, encode_command

_LOG_TAIL = 30

# Variables the worker keeps: the locale, where libraries are, and what the vendor runtime, the NPU driver
# and the simulated runtime read.
_KEEP_NAMES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH"})
_KEEP_PREFIXES = ("LC_", "RKLLM_", "RKNN_")
_DROP_PREFIXES = ("RKLLM_MQTT_",)

# Run by ``python -I -c``: take the daemon's sys.path (argv[1], JSON), then run the worker.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
    "from rkllm_mqtt.runtime.worker import main; sys.exit(main())"
)


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` the worker may see."""
    return {
        name: value
        for name, value in environ.items()
        if (name in _KEEP_NAMES or name.startswith(_KEEP_PREFIXES)) and not name.startswith(_DROP_PREFIXES)
    }


def worker_command(event_fd: int) -> list[str]:
    return [sys.executable, "-I", "-c", _BOOT, json.dumps(sys.path), "--event-fd", str(event_fd)]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class WorkerHandle:
    """One worker process: its command pipe (stdin), its event pipe, and what its output said."""

    proc: subprocess.Popen[bytes]
    events: EventReader
    dead: threading.Event = field(default_factory=threading.Event)
    log_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_LOG_TAIL))
    log_done: threading.Event = field(default_factory=threading.Event)
    # Set when the worker's marker line after rkllm_init was read: everything rkllm_init printed was read too.
    init_logged: threading.Event = field(default_factory=threading.Event)
    # The version the runtime printed during rkllm_init ("rkllm-runtime version: X.Y.Z"), if it did.
    said_version: str | None = None
    kill_reason: str | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, op: str, **fields: Any) -> bool:
        stdin = self.proc.stdin
        if stdin is None:
            return False
        try:
            with self.send_lock:
                stdin.write(encode_command(op, **fields))
                stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the process has ended, or None if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
