"""The ledger's settled ids in memory: a fixed ring of short keys with a hash index, in a few flat buffers.

A dict of strings would do the same job, but during a flood the ids settled last are allocated among tens of
thousands of short-lived objects, and each one that survives keeps a whole 1 MiB arena of Python's small-object
heap (or a page of the C heap) from being given back: 10,000 remembered ids held some 25 MB after a 50,000-prompt
QoS 1 flood (docs/reliability.md, "Floods"). Here the ids live in buffers allocated once, at their full size, so
remembering one costs no allocation at all.

Keys are ASCII, at most :data:`KEY_BYTES` long (request ids are at most 64 characters). The ring keeps them in the
order they were added; adding a key that is already there moves it to the newest end, and adding to a full ring
drops the oldest. The index is open addressing with linear probing over Python's randomised ``hash`` (a sender
cannot choose ids that collide), twice the ring's size so probes stay short.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

KEY_BYTES = 72  # "handoff:" and a 32-digit token, or a request id of up to 64 characters
_EMPTY = 0  # in the index: no slot (slots are stored plus one)


class SettledIds:
    """At most ``capacity`` keys, each with the time it was added, oldest first."""

    def __init__(self, capacity: int) -> None:
        size = 1
        while size < 2 * capacity:
            size *= 2
        self.capacity = capacity
        self._keys = bytearray(capacity * KEY_BYTES)
        self._lengths = array("B", bytes(capacity))  # 0: a free slot, or one whose key was taken out
        self._hashes = array("q", bytes(8 * capacity))
        self._times = array("d", bytes(8 * capacity))
        self._index = array("i", bytes(4 * size))
        self._mask = size - 1
        self._head = 0  # the oldest slot in use
        self._used = 0  # slots from the head on, including emptied ones
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def when(self, key: str) -> float | None:
        """When ``key`` was added, or None when it is not here."""
        encoded = _encoded(key)
        if encoded is None:
            return None
        _, slot = self._find(encoded, hash(encoded))
        return None if slot < 0 else self._times[slot]

    def add(self, key: str, when: float) -> None:
        """Remember ``key`` as the newest (dropping the oldest when full). ValueError for a key that cannot be kept."""
        encoded = _encoded(key)
        if encoded is None:
            raise ValueError(f"not a key of at most {KEY_BYTES} ASCII characters: {key!r}")
        digest = hash(encoded)
        position, slot = self._find(encoded, digest)
        if slot >= 0:
            self._take_out(position, slot)
        if self._used == self.capacity:
            self._drop_head()
        slot = (self._head + self._used) % self.capacity
        start = slot * KEY_BYTES
        self._keys[start : start + len(encoded)] = encoded
        self._lengths[slot] = len(encoded)
        self._hashes[slot] = digest
        self._times[slot] = when
        self._used += 1
        self._live += 1
        position, _ = self._find(encoded, digest)  # the free position the search stopped at
        self._index[position] = slot + 1

    def discard(self, key: str) -> None:
        encoded = _encoded(key)
        if encoded is None:
            return
        position, slot = self._find(encoded, hash(encoded))
        if slot >= 0:
            self._take_out(position, slot)

    def oldest(self) -> tuple[str, float] | None:
        self._skip_emptied()
        if not self._used:
            return None
        return self._key(self._head), self._times[self._head]

    def pop_oldest(self) -> None:
        self._skip_emptied()
        if self._used:
            self._drop_head()

    def items(self) -> Iterator[tuple[str, float]]:
        """Every key and its time, oldest first."""
        for offset in range(self._used):
            slot = (self._head + offset) % self.capacity
            if self._lengths[slot]:
                yield self._key(slot), self._times[slot]

    # -- internals -------------------------------------------------------------------------------------

    def _key(self, slot: int) -> str:
        start = slot * KEY_BYTES
        return self._keys[start : start + self._lengths[slot]].decode("ascii")

    def _find(self, encoded: bytes, digest: int) -> tuple[int, int]:
        """(index position, slot) of the key, or (the free position where it would go, -1)."""
        index, mask, size = self._index, self._mask, len(encoded)
        position = digest & mask
        while True:
            entry = index[position]
            if entry == _EMPTY:
                return position, -1
            slot = entry - 1
            if self._hashes[slot] == digest and self._lengths[slot] == size:
                start = slot * KEY_BYTES
                if self._keys[start : start + size] == encoded:
                    return position, slot
            position = (position + 1) & mask

    def _take_out(self, position: int, slot: int) -> None:
        """Remove a key from the index; its slot stays in the ring, emptied, until the head passes it."""
        self._unindex(position)
        self._lengths[slot] = 0
        self._live -= 1

    def _drop_head(self) -> None:
        slot = self._head
        if self._lengths[slot]:
            position = self._hashes[slot] & self._mask
            while self._index[position] != slot + 1:
                position = (position + 1) & self._mask
            self._take_out(position, slot)
        self._head = (self._head + 1) % self.capacity
        self._used -= 1

    def _skip_emptied(self) -> None:
        while self._used and not self._lengths[self._head]:
            self._head = (self._head + 1) % self.capacity
            self._used -= 1

    def _unindex(self, hole: int) -> None:
        """Empty an index position and move back the entries after it that probed past it (so every key stays
        reachable from its home position without markers for removed ones)."""
        index, mask = self._index, self._mask
        index[hole] = _EMPTY
        position = hole
        while True:
            position = (position + 1) & mask
            entry = index[position]
            if entry == _EMPTY:
                return
            home = self._hashes[entry - 1] & mask
            # The entry may fill the hole unless its home lies cyclically after the hole, up to its position.
            if (hole < home <= position) if hole <= position else (home > hole or home <= position):
                continue
            index[hole] = entry
            index[position] = _EMPTY
            hole = position


def _encoded(key: str) -> bytes | None:
    if not key or len(key) > KEY_BYTES or not key.isascii():
        return None
    return key.encode("ascii")
