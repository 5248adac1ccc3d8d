"""Acknowledging received QoS 1 messages once they are settled, in the order they arrived.

MQTT asks a client to send its PUBACKs in the order the PUBLISHes arrived (MQTT 3.1.1 and 5, section 4.6). The
bridge settles requests out of order (a rejected request is settled at once, the one before it only when its
final response is out), so a settled message whose predecessors are not settled yet waits here, and one settle
may release several acknowledgements at once.

A new connection starts a new epoch: the broker sends whatever was unacknowledged again (with the DUP flag and
its original packet id), so deliveries of the old connection are forgotten and never acknowledged on the new one.
Pure book-keeping: the transport sends the acknowledgements this returns.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Delivery:
    """One QoS 1 PUBLISH received and not yet acknowledged."""

    mid: int
    epoch: int
    settled: bool = field(default=False)


class AckSequencer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._pending: collections.deque[Delivery] = collections.deque()

    def arrived(self, mid: int) -> Delivery:
        """Record a PUBLISH that must be acknowledged later. paho's thread, in arrival order."""
        with self._lock:
            delivery = Delivery(mid, self._epoch)
            self._pending.append(delivery)
            return delivery

    def settle(self, delivery: Delivery, send: Callable[[int], object]) -> int:
        """Mark ``delivery`` settled and ``send`` the acknowledgements this releases, in order. Any thread.

        ``send`` is called with the lock held, so two threads settling at once cannot reorder the acknowledgements.
        Returns how many were sent."""
        with self._lock:
            if delivery.settled:
                return 0
            delivery.settled = True
            if delivery.epoch != self._epoch:
                return 0  # received on a connection that is gone: the broker sends it again
            sent = 0
            while self._pending and self._pending[0].settled:
                send(self._pending.popleft().mid)
                sent += 1
            return sent

    def new_connection(self) -> int:
        """A new connection: forget what was pending on the old one. Returns how many were pending."""
        with self._lock:
            self._epoch += 1
            dropped = len(self._pending)
            self._pending.clear()
            return dropped

    @property
    def unacknowledged(self) -> int:
        with self._lock:
            return len(self._pending)
