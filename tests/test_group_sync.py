"""Acknowledgements after the ledger's sync: one sync covers every callback that came while the last one ran."""

from __future__ import annotations

import threading

from rkllm_mqtt.bridge.group_sync import GroupSync

WAIT_S = 30.0


class _Disk:
    """A sync that can be held, as a slow SD card holds fdatasync."""

    def __init__(self) -> None:
        self.syncs = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def sync(self) -> None:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        self.syncs += 1


def test_callbacks_that_come_during_a_sync_share_the_next_one() -> None:
    disk = _Disk()
    group = GroupSync(disk.sync)
    done: list[int] = []
    all_done = threading.Event()

    def callback(index: int) -> None:
        # Called only after a sync that began after it was queued: the sync count says so.
        done.append(index)
        if len(done) == 101:
            all_done.set()

    group.start()
    try:
        disk.release.clear()
        group.after_sync(lambda: callback(0))
        assert disk.entered.wait(WAIT_S)  # the first sync runs, and is held
        for index in range(1, 101):
            group.after_sync(lambda index=index: callback(index))
        assert done == []  # nothing acknowledged before its sync
        disk.release.set()
        assert all_done.wait(WAIT_S)
    finally:
        group.stop()
    assert sorted(done) == list(range(101))
    assert disk.syncs == 2  # one for the first, one for the hundred that came while it ran


def test_after_stop_a_callback_still_runs_after_its_own_sync() -> None:
    disk = _Disk()
    group = GroupSync(disk.sync)
    group.start()
    group.stop()
    ran: list[int] = []
    group.after_sync(lambda: ran.append(disk.syncs))
    assert ran == [1]


def test_a_failed_sync_is_logged_and_the_callbacks_still_run() -> None:
    def failing() -> None:
        raise OSError(5, "Input/output error")

    group = GroupSync(failing)
    ran = threading.Event()
    group.start()
    try:
        group.after_sync(ran.set)
        assert ran.wait(WAIT_S)
    finally:
        group.stop()
