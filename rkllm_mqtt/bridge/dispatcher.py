"""The MQTT door's own thread: one inbox handled in arrival order, and deadlines instead of timer threads.

Foreign threads (paho's network loop, the runtime supervisor) only put items in the inbox and never wait:
:meth:`Dispatcher.offer` refuses an item when the inbox holds ``capacity`` messages, and the caller decides what
to do with it (answer it, handle it inline); :meth:`Dispatcher.put` is for the few control items (connected,
runtime changed) that must never be refused. Work that should happen later (a debounced re-announce, the
stale-config sweep) is a deadline on this same thread (:meth:`call_later`): no thread per timer, and the
handlers never need a lock among themselves.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

Item = TypeVar("Item")
# The longest one item may take before the dispatcher counts as wedged (for the watchdog).
WEDGED_AFTER_S = 60.0


@dataclass(order=True)
class Deadline:
    """A call scheduled on the dispatcher thread. ``cancel()`` it from that thread."""

    when: float
    seq: int
    action: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class _Stop:
    pass


_STOP = _Stop()


class Dispatcher(Generic[Item]):
    def __init__(
        self,
        handle: Callable[[Item], None],
        *,
        capacity: int,
        name: str = "mqtt-dispatch",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handle = handle
        self.capacity = capacity
        self.name = name
        self.clock = clock
        self._inbox: queue.SimpleQueue[Item | _Stop] = queue.SimpleQueue()
        self._deadlines: list[Deadline] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._handling_since: float | None = None

    # -- any thread ---------------------------------------------------------------------------------------

    def offer(self, item: Item) -> bool:
        """Queue ``item`` unless ``capacity`` items wait already. Never blocks."""
        if self._inbox.qsize() >= self.capacity:
            return False
        self._inbox.put(item)
        return True

    def put(self, item: Item) -> None:
        """Queue a control item whatever the inbox holds. For rare items only (they are not bounded)."""
        self._inbox.put(item)

    @property
    def depth(self) -> int:
        return self._inbox.qsize()

    def healthy(self, now: float | None = None) -> bool:
        """The thread lives and is not stuck in one item. Read only: no side effects."""
        now = self.clock() if now is None else now
        thread = self._thread
        since = self._handling_since
        return thread is not None and thread.is_alive() and (since is None or now - since < WEDGED_AFTER_S)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Handle what is queued, then stop; deadlines not yet due are dropped."""
        self._inbox.put(_STOP)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the dispatcher thread only ---------------------------------------------------------------------------

    def call_later(self, delay_s: float, action: Callable[[], None]) -> Deadline:
        """Run ``action`` on the dispatcher thread in ``delay_s`` seconds. Call from the dispatcher thread."""
        deadline = Deadline(self.clock() + delay_s, next(self._seq), action)
        heapq.heappush(self._deadlines, deadline)
        return deadline

    def _loop(self) -> None:
        while True:
            timeout = None
            if self._deadlines:
                timeout = max(0.0, self._deadlines[0].when - self.clock())
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            self._run_due()
            if item is None:
                continue
            if isinstance(item, _Stop):
                return
            self._run(partial(self.handle, item), "item", type(item).__name__)

    def _run_due(self) -> None:
        now = self.clock()
        while self._deadlines and self._deadlines[0].when <= now:
            deadline = heapq.heappop(self._deadlines)
            if not deadline.cancelled:
                self._run(deadline.action, "deadline", getattr(deadline.action, "__name__", "action"))

    def _run(self, work: Callable[[], None], kind: str, name: str) -> None:
        self._handling_since = self.clock()
        try:
            work()
        except Exception:  # the daemon never crashes on input: log it and go on
            log.exception("dispatch_failed", kind=kind, item=name)
        finally:
            self._handling_since = None
