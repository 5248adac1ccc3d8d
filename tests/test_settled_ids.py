"""The ledger's fixed ring of settled ids behaves as an ordered dict bounded to its capacity."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllm_mqtt.bridge.settled_ids import KEY_BYTES, SettledIds

# A few short keys, so that adding again, taking out and colliding in the index all happen often.
_keys = st.sampled_from([f"k{i}" for i in range(12)] + ["x" * KEY_BYTES, "handoff:" + "a" * 32])
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _keys),
        st.tuples(st.just("discard"), _keys),
        st.tuples(st.just("pop_oldest"), st.none()),
    ),
    max_size=200,
)


class _Model:
    """What SettledIds promises, written plainly."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: collections.deque[tuple[str, float] | None] = collections.deque()

    def live(self) -> list[tuple[str, float]]:
        return [entry for entry in self.slots if entry is not None]

    def add(self, key: str, when: float) -> None:
        self.discard(key)
        if len(self.slots) == self.capacity:
            self.slots.popleft()
        self.slots.append((key, when))

    def discard(self, key: str) -> None:
        self.slots = collections.deque(None if e is not None and e[0] == key else e for e in self.slots)

    def pop_oldest(self) -> None:
        while self.slots and self.slots[0] is None:
            self.slots.popleft()
        if self.slots:
            self.slots.popleft()


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 6), operations=_operations)
def test_the_ring_matches_a_plain_model(capacity: int, operations: list[tuple[str, str | None]]) -> None:
    ids, model = SettledIds(capacity), _Model(capacity)
    for step, (name, key) in enumerate(operations):
        if name == "add":
            assert key is not None
            ids.add(key, float(step))
            model.add(key, float(step))
        elif name == "discard":
            assert key is not None
            ids.discard(key)
            model.discard(key)
        else:
            ids.pop_oldest()
            model.pop_oldest()
        live = model.live()
        assert list(ids.items()) == live
        assert len(ids) == len(live)
        assert ids.oldest() == (live[0] if live else None)
        present = dict(live)
        for candidate in [f"k{i}" for i in range(12)]:
            assert ids.when(candidate) == present.get(candidate)


def test_a_full_ring_of_ten_thousand_keeps_the_newest() -> None:
    ids = SettledIds(10_000)
    for n in range(25_000):
        ids.add(f"fl1-abcdef-{n:06d}", float(n))
    assert len(ids) == 10_000
    assert ids.when("fl1-abcdef-014999") is None
    assert ids.when("fl1-abcdef-015000") == 15_000.0
    assert ids.when("fl1-abcdef-024999") == 24_999.0
    assert ids.oldest() == ("fl1-abcdef-015000", 15_000.0)


@pytest.mark.parametrize("bad", ["", "x" * (KEY_BYTES + 1), "caf\u00e9"])
def test_keys_it_cannot_hold_are_refused_and_never_found(bad: str) -> None:
    ids = SettledIds(4)
    with pytest.raises(ValueError):
        ids.add(bad, 1.0)
    assert ids.when(bad) is None
    ids.discard(bad)
    assert len(ids) == 0


@pytest.mark.parametrize("capacity", [1, 3, 8, 13])
def test_a_long_random_run_matches_the_model(capacity: int) -> None:
    # Many keys over a small index: probes wrap around its end and keys are taken out from the middle of runs.
    rng = random.Random(capacity)
    keys = [f"id-{n}" for n in range(4 * capacity + 8)]
    ids, model = SettledIds(capacity), _Model(capacity)
    for step in range(4000):
        roll, key = rng.random(), rng.choice(keys)
        if roll < 0.6:
            ids.add(key, float(step))
            model.add(key, float(step))
        elif roll < 0.9:
            ids.discard(key)
            model.discard(key)
        else:
            ids.pop_oldest()
            model.pop_oldest()
        present = dict(model.live())
        assert [ids.when(k) for k in keys] == [present.get(k) for k in keys]
    assert list(ids.items()) == model.live()
