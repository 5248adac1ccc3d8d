"""What one wake-up of a Python thread costs on this machine: ``python -m bench.wakeup [interval_ms] [count]``.

A child process writes one byte to a pipe every ``interval_ms``; a Python thread here sleeps in ``poll()`` on it
and reads each byte. The CPU time of that thread divided by the bytes read is the floor of any per-token hand-off
between threads or processes at that token rate: no work is done per wake-up besides the wake-up itself.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

_WRITER = """
import os, sys, time
fd, interval, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
due = time.monotonic()
for _ in range(count):
    due += interval
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    os.write(fd, b"x")
"""


@contextlib.contextmanager
def ticker(interval_s: float, count: int) -> Iterator[Iterator[int]]:
    """A process that writes one byte to a pipe every ``interval_s``, ``count`` times; yields an iterator of the
    ticks each wake-up of the reader brought. The process is started before the caller starts its clock."""
    read_fd, write_fd = os.pipe()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(write_fd), str(interval_s), str(count)], pass_fds=(write_fd,)
    )
    os.close(write_fd)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)

    def wakeups() -> Iterator[int]:
        while True:
            poller.poll()
            data = os.read(read_fd, 4096)
            if not data:
                return
            yield len(data)

    try:
        yield wakeups()
    finally:
        writer.wait()
        os.close(read_fd)


def cpu_per_wakeup_us(interval_s: float, count: int) -> float:
    with ticker(interval_s, count) as wakeups:
        started = time.thread_time_ns()
        woken = sum(wakeups)
        used = time.thread_time_ns() - started
    return used / max(woken, 1) / 1000


def main(argv: list[str]) -> int:
    interval_ms = float(argv[0]) if argv else 50.0
    count = int(argv[1]) if len(argv) > 1 else 200
    print(f"every {interval_ms:g} ms: {cpu_per_wakeup_us(interval_ms / 1000, count):.1f} us of CPU per wake-up")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
