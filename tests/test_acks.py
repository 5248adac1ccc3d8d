"""Acknowledgements go out in arrival order, only for settled messages, never for an old connection's."""

from __future__ import annotations

import random
import threading

from rkllm_mqtt.bridge.acks import AckSequencer, Delivery


def test_acks_wait_for_the_messages_before_them() -> None:
    acks = AckSequencer()
    sent: list[int] = []
    first, second, third = acks.arrived(1), acks.arrived(2), acks.arrived(3)
    assert acks.settle(second, sent.append) == 0
    assert acks.settle(third, sent.append) == 0
    assert sent == []
    assert acks.unacknowledged == 3
    assert acks.settle(first, sent.append) == 3
    assert sent == [1, 2, 3]
    assert acks.unacknowledged == 0


def test_settling_twice_sends_once() -> None:
    acks = AckSequencer()
    sent: list[int] = []
    only = acks.arrived(7)
    acks.settle(only, sent.append)
    acks.settle(only, sent.append)
    assert sent == [7]


def test_a_new_connection_forgets_the_old_deliveries() -> None:
    acks = AckSequencer()
    sent: list[int] = []
    old = acks.arrived(1)
    assert acks.new_connection() == 1
    again = acks.arrived(1)  # the broker sends it again with its original packet id
    acks.settle(old, sent.append)
    assert sent == []
    acks.settle(again, sent.append)
    assert sent == [1]


def _settle_all(acks: AckSequencer, part: list[Delivery], sent: list[int]) -> None:
    for delivery in part:
        acks.settle(delivery, sent.append)


def test_any_settle_order_from_many_threads_acknowledges_in_arrival_order() -> None:
    for seed in range(20):
        acks = AckSequencer()
        sent: list[int] = []
        deliveries = [acks.arrived(mid) for mid in range(1, 201)]
        shuffled = deliveries[:]
        random.Random(seed).shuffle(shuffled)
        halves = [shuffled[::2], shuffled[1::2]]
        threads = [threading.Thread(target=_settle_all, args=(acks, part, sent)) for part in halves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sent == list(range(1, 201))
