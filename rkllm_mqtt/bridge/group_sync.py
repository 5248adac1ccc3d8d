"""Acknowledging settled prompts after the ledger is on disk, with one disk sync for all that wait.

A prompt is acknowledged to the broker only once the record of its final is on disk (docs/reliability.md): a
power cut must not leave the broker believing a request was answered while the record that says so is gone. One
``fdatasync`` per acknowledged final held paho's network thread for the length of a disk flush each time (several
milliseconds on an SD card): a burst of a thousand answers stalled the connection for seconds. Here the callbacks
wait on a thread of their own, and each sync covers every callback that came while the previous one ran (a group
commit): under load, one flush for hundreds of acknowledgements; alone, one flush as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class GroupSync:
    """Runs callbacks once everything written before them is synced by ``sync``. Thread-safe."""

    def __init__(self, sync: Callable[[], None], *, name: str = "ledger-sync") -> None:
        self.sync = sync
        self.name = name
        self._waiting: list[Callable[[], None]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Sync and run what waits; later callbacks run at once, after their own sync, on the caller's thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_sync(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once what was written so far is on disk. Never waits for the disk (unless stopped)."""
        with self._cond:
            if not self._stopped and self._thread is not None:
                self._waiting.append(callback)
                self._cond.notify()
                return
        self._run([callback])

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._waiting) or self._stopped)
                batch, self._waiting = self._waiting, []
                if not batch and self._stopped:
                    return
            self._run(batch)

    def _run(self, batch: list[Callable[[], None]]) -> None:
        try:
            self.sync()
        except OSError as exc:
            # The records are written (a killed process cannot lose them); only a power cut could. Holding the
            # acknowledgements back would stop the prompts altogether, so they go out, and the log says why.
            log.error("ledger_sync_failed", error=str(exc), waiting=len(batch))
        for callback in batch:
            try:
                callback()
            except Exception:
                log.exception("after_sync_failed")
