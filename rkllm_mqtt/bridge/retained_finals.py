"""Final responses published retained for a short while, so a subscriber that arrives after the answer still gets it.

A client that publishes a request and only then subscribes to the reply topic (Home Assistant's
``wait_for_trigger`` does exactly that) misses a final response that is faster than its SUBSCRIBE: a refusal
comes back within milliseconds. A retained final is handed to such a late subscriber when its subscription arrives.

Nothing may stay retained for long, so the retained copy goes away after ``limits.final_retain_s``:

- on MQTT 5 the final carries a Message Expiry Interval and the broker drops it by itself;
- on MQTT 3.1.1 (the embedded broker, old brokers) the bridge clears it with an empty retained publish once the time
  is up. All clears are kept in one heap served by one thread, however many requests are in flight; a clean stop
  clears what is still pending. Only a daemon killed outright leaves the last finals retained.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from rkllm_mqtt.bridge.publishing import ExpiringPublishing

log = structlog.get_logger(__name__)


@dataclass(order=True, frozen=True)
class _Due:
    at: float
    seq: int
    topic: str = field(compare=False)


class ClearSchedule:
    """When each retained final must be cleared. Pure: no clock and no thread of its own.

    A topic can carry several finals in a row (a reply topic shared by many requests): only the newest one's time
    counts, so clearing an older final never wipes a newer one that is still within its time.
    """

    def __init__(self) -> None:
        self._heap: list[_Due] = []
        self._newest: dict[str, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        """Topics that still hold a retained final to clear."""
        return len(self._newest)

    def add(self, topic: str, at: float) -> None:
        self._seq += 1
        self._newest[topic] = self._seq
        heapq.heappush(self._heap, _Due(at, self._seq, topic))

    def next_at(self) -> float | None:
        self._drop_superseded()
        return self._heap[0].at if self._heap else None

    def pop_due(self, now: float) -> list[str]:
        """Topics whose newest retained final is due for clearing at ``now``, oldest first."""
        due: list[str] = []
        while self._heap and self._heap[0].at <= now:
            entry = heapq.heappop(self._heap)
            if self._newest.get(entry.topic) == entry.seq:
                del self._newest[entry.topic]
                due.append(entry.topic)
        return due

    def pop_all(self) -> list[str]:
        """Every topic still to clear, oldest first; the schedule is empty afterwards."""
        topics = [topic for topic, _ in sorted(self._newest.items(), key=lambda item: item[1])]
        self._heap.clear()
        self._newest.clear()
        return topics

    def _drop_superseded(self) -> None:
        while self._heap and self._newest.get(self._heap[0].topic) != self._heap[0].seq:
            heapq.heappop(self._heap)


class RetainedFinals:
    """Publishes final responses retained for ``retain_s`` seconds (0: not retained at all, as before)."""

    def __init__(
        self,
        transport: ExpiringPublishing,
        retain_s: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.retain_s = retain_s
        self.clock = clock
        self._schedule = ClearSchedule()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def pending(self) -> int:
        """Retained finals this bridge still has to clear (MQTT 3.1.1 only)."""
        with self._cond:
            return len(self._schedule)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._clear_loop, name="retained-finals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the clearing thread and clear every final still retained, so a clean stop leaves nothing behind."""
        with self._cond:
            self._stopping = True
            remaining = self._schedule.pop_all()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
        self._clear(remaining)

    def publish(
        self, topic: str, payload: bytes, correlation: bytes | None, *, on_acked: Callable[[], None] | None = None
    ) -> object:
        """Publish one final response; returns what the transport returned (None: it refused the message).
        ``on_acked`` runs once the broker has it (the transport's promise)."""
        # on_acked only when there is one: a transport that settles nothing need not know the keyword.
        extra: dict[str, Any] = {"on_acked": on_acked} if on_acked is not None else {}
        if self.retain_s <= 0:
            return self.transport.publish(topic, payload, qos=1, correlation_data=correlation, **extra)
        if self.transport.expires_messages:
            return self.transport.publish(
                topic, payload, qos=1, retain=True, correlation_data=correlation, expiry_s=self.retain_s, **extra
            )
        # MQTT 3.1.1 has no expiry: the bridge clears it later. A refused message was never retained.
        result = self.transport.publish(topic, payload, qos=1, retain=True, correlation_data=correlation, **extra)
        if result is not None:
            with self._cond:
                # Publishers stop before this does: after the stop has cleared, nothing more needs scheduling.
                if not self._stopping:
                    self._schedule.add(topic, self.clock() + self.retain_s)
                    self._cond.notify_all()
        return result

    def clear_due(self) -> int:
        """Clear the retained finals whose time is up; returns how many. The clearing thread calls it."""
        with self._cond:
            due = self._schedule.pop_due(self.clock())
        self._clear(due)
        return len(due)

    def _clear(self, topics: list[str]) -> None:
        for topic in topics:
            # An empty retained publish deletes the retained message (MQTT 3.1.1 §3.3.1.3).
            self.transport.publish(topic, b"", qos=1, retain=True)
        if topics:
            log.debug("retained_finals_cleared", count=len(topics))

    def _clear_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    next_at = self._schedule.next_at()
                    now = self.clock()
                    if next_at is not None and next_at <= now:
                        break
                    self._cond.wait(None if next_at is None else next_at - now)
                if self._stopping:
                    return
            try:
                self.clear_due()
            except Exception:  # a failed clear must not end the thread that serves all the others
                log.exception("retained_finals_clear_failed")
