"""The refusal rate that tells a flood from a client's occasional mistake."""

from __future__ import annotations

from rkllm_mqtt.bridge.rate import EventRate


def test_the_refusal_rate_counts_about_one_second() -> None:
    clock = [100.0]
    rate = EventRate(3, clock=lambda: clock[0])
    assert [rate.add() for _ in range(4)] == [False, False, False, True]
    clock[0] = 101.5  # the previous second counts for the half still in the window: 2 of its 4
    assert not rate.add() and rate.add()  # 2 + 1, then 2 + 2
    clock[0] = 103.0  # more than a second of silence
    assert not rate.fast()
