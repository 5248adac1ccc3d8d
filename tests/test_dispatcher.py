"""The MQTT door's thread: a bounded inbox that never blocks, and deadlines instead of timer threads."""

from __future__ import annotations

import threading

from rkllm_mqtt.bridge.dispatcher import WEDGED_AFTER_S, Dispatcher

from .helpers import eventually

WAIT_S = 30.0


class Recorder:
    def __init__(self) -> None:
        self.items: list[object] = []
        self.done = threading.Event()
        self.until: object = None

    def __call__(self, item: object) -> None:
        if item == "boom":
            raise ValueError("a handler that fails")
        self.items.append(item)
        if item == self.until:
            self.done.set()


def test_offer_refuses_past_capacity_and_put_never_does() -> None:
    dispatcher: Dispatcher[object] = Dispatcher(Recorder(), capacity=2)  # not started: nothing is taken out
    assert dispatcher.offer("a") and dispatcher.offer("b")
    assert not dispatcher.offer("c")
    dispatcher.put("control")
    assert dispatcher.depth == 3


def test_items_are_handled_in_order_and_a_failing_one_does_not_stop_the_thread() -> None:
    recorder = Recorder()
    recorder.until = "last"
    dispatcher: Dispatcher[object] = Dispatcher(recorder, capacity=10)
    dispatcher.start()
    try:
        for item in ("one", "boom", "two", "last"):
            assert dispatcher.offer(item)
        assert recorder.done.wait(WAIT_S)
        assert recorder.items == ["one", "two", "last"]
        assert dispatcher.healthy()
    finally:
        dispatcher.stop()


def test_deadlines_run_on_the_dispatcher_thread_in_time_order_and_can_be_cancelled() -> None:
    ran: list[tuple[str, str]] = []
    done = threading.Event()
    dispatcher: Dispatcher[object] = Dispatcher(lambda item: None, capacity=10)

    def note(name: str) -> None:
        ran.append((name, threading.current_thread().name))
        if name == "last":
            done.set()

    def schedule(item: object) -> None:
        # Deadlines are set from the dispatcher thread, as extensions do.
        dispatcher.call_later(0.02, lambda: note("last"))
        dispatcher.call_later(0.01, lambda: note("second"))
        dispatcher.call_later(0.0, lambda: note("first"))
        dispatcher.call_later(0.0, lambda: note("cancelled")).cancel()

    dispatcher.handle = schedule
    dispatcher.start()
    try:
        dispatcher.offer("go")
        assert done.wait(WAIT_S)
        assert [name for name, _ in ran] == ["first", "second", "last"]
        assert {thread for _, thread in ran} == {dispatcher.name}
    finally:
        dispatcher.stop()


def test_health_is_read_without_side_effects_and_sees_a_stuck_item() -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(item: object) -> None:
        entered.set()
        release.wait(WAIT_S)

    now = [1000.0]
    dispatcher: Dispatcher[object] = Dispatcher(stuck, capacity=10, clock=lambda: now[0])
    assert not dispatcher.healthy()  # not started
    dispatcher.start()
    try:
        depth = dispatcher.depth
        assert dispatcher.healthy()
        assert dispatcher.depth == depth
        dispatcher.offer("slow")
        assert entered.wait(WAIT_S)
        assert dispatcher.healthy(now[0] + WEDGED_AFTER_S - 1)
        assert not dispatcher.healthy(now[0] + WEDGED_AFTER_S + 1)
    finally:
        release.set()
        dispatcher.stop()


def test_stop_handles_what_is_queued_first() -> None:
    recorder = Recorder()
    dispatcher: Dispatcher[object] = Dispatcher(recorder, capacity=10)
    for item in range(5):
        dispatcher.offer(item)
    dispatcher.start()
    dispatcher.stop(WAIT_S)
    assert recorder.items == [0, 1, 2, 3, 4]


def test_in_a_flood_the_newest_and_the_oldest_message_go_in_turn_and_every_message_is_still_handled() -> None:
    gate = threading.Event()
    handled: list[object] = []
    all_done = threading.Event()

    def handle(item: object) -> None:
        if item == "blocker":
            assert gate.wait(WAIT_S)
        handled.append(item)
        if len(handled) == 12:
            all_done.set()

    dispatcher: Dispatcher[object] = Dispatcher(handle, capacity=100, flood_above=3)
    dispatcher.start()
    try:
        dispatcher.offer("blocker")
        # The blocker is being handled once the inbox is empty again: everything offered now waits behind it.
        assert eventually(lambda: dispatcher.depth == 0)
        for index in range(10):
            dispatcher.offer(index)
        dispatcher.put("control")
        gate.set()
        assert all_done.wait(WAIT_S)
    finally:
        dispatcher.stop()
    # Control first; then, while more than 3 wait, the newest and the oldest in turn (9, 0, 8, 1, 7, 2, 6 leave
    # 3, 4, 5), then in order.
    assert handled == ["blocker", "control", 9, 0, 8, 1, 7, 2, 6, 3, 4, 5]


def test_offer_refuses_past_the_bytes_it_may_hold_but_takes_one_large_message_alone() -> None:
    dispatcher: Dispatcher[object] = Dispatcher(Recorder(), capacity=100, capacity_bytes=1000)  # not started
    assert dispatcher.offer("huge", 5000)  # alone in the inbox: taken, or it could never be answered
    assert not dispatcher.offer("small", 10)
    started = Recorder()
    started.until = "c"
    running: Dispatcher[object] = Dispatcher(started, capacity=100, capacity_bytes=1000)
    assert running.offer("a", 600) and running.offer("b", 400)
    assert not running.offer("c", 1)
    running.start()
    try:
        assert eventually(lambda: running.depth == 0)  # taken: their bytes are given back
        assert running.offer("c", 1000)
        assert started.done.wait(WAIT_S)
        assert started.items == ["a", "b", "c"]
    finally:
        running.stop()
