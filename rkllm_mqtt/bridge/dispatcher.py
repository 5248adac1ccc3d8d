"""The MQTT door's own thread: one inbox, and deadlines instead of timer threads.

Messages are handled in arrival order, except in a flood: while more than ``flood_above`` wait, the newest and the
oldest are taken in turn. Everything in the inbox will be handled either way; what changes is who waits. In
arrival order, a request sent after a flood of 50,000 prompts waited until every one of them was answered; with
the newest taken every other time, it is answered as soon as it arrives. The oldest are taken in between because
QoS 1 prompts are acknowledged in arrival order: taking only the newest held back every acknowledgement until the
inbox was nearly empty, and Mosquitto, which sends more to a client as its acknowledgements come, then sent the
rest of the flood in bursts, seconds apart. (Without a flood the inbox holds a few messages and the order is the
arrival order.) Control items (:meth:`Dispatcher.put`) go before messages.

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
from collections import deque
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
        flood_above: int | None = None,
        capacity_bytes: int | None = None,
    ) -> None:
        self.handle = handle
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.name = name
        self.clock = clock
        self.flood_above = flood_above
        # Items sit in two deques (appends and pops are atomic); the doorbell holds one token per item and is
        # what the thread waits on. An item is appended before its token is rung, so a token always finds one.
        self._messages: deque[tuple[Item, int]] = deque()
        # The sizes of the messages waiting: what was offered less what was taken. The dispatcher alone writes
        # what was taken, without a lock: one lock taken by both sides per message made the network thread wait
        # for the dispatcher whenever the interpreter switched threads while the dispatcher held it. Offers (two
        # network threads: the prompts' session and the control session) share a lock only among themselves.
        self._bytes_in = 0
        self._bytes_out = 0
        self._offer_lock = threading.Lock()
        self._control: deque[Item | _Stop] = deque()
        self._doorbell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._deadlines: list[Deadline] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._handling_since: float | None = None
        self._newest_next = False  # in a flood, the newest and the oldest message are taken in turn

    # -- any thread ---------------------------------------------------------------------------------------

    def offer(self, item: Item, size: int = 0) -> bool:
        """Queue ``item`` unless ``capacity`` messages, or ``capacity_bytes`` of them (``size`` each), wait
        already; a message alone in the inbox is taken whatever its size. Never blocks."""
        if len(self._messages) >= self.capacity:
            return False
        with self._offer_lock:
            if (
                self.capacity_bytes is not None
                and self._messages
                and self._bytes_in - self._bytes_out + size > self.capacity_bytes
            ):
                return False
            self._bytes_in += size
        self._messages.append((item, size))
        self._doorbell.put(None)
        return True

    def put(self, item: Item) -> None:
        """Queue a control item whatever the inbox holds; it goes before the messages. For rare items only
        (they are not bounded)."""
        self._control.append(item)
        self._doorbell.put(None)

    @property
    def depth(self) -> int:
        return len(self._messages) + len(self._control)

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
        self._control.append(_STOP)
        self._doorbell.put(None)
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
            item = self._next(timeout)
            self._run_due()
            if item is None:
                continue
            if isinstance(item, _Stop):
                while self._messages:  # what was queued before the stop is still handled, in arrival order
                    self._run_item(self._taken(self._messages.popleft()))
                return
            self._run_item(item)

    def _next(self, timeout: float | None) -> Item | _Stop | None:
        try:
            self._doorbell.get(timeout=timeout)
        except queue.Empty:
            return None
        if self._control:
            return self._control.popleft()
        if self.flood_above is not None and len(self._messages) > self.flood_above:
            self._newest_next = not self._newest_next
            if self._newest_next:
                return self._taken(self._messages.pop())
        return self._taken(self._messages.popleft())

    def _taken(self, entry: tuple[Item, int]) -> Item:
        item, size = entry
        self._bytes_out += size
        return item

    def _run_item(self, item: Item) -> None:
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
