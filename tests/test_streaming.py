"""The stream sink: one message per token, coalescing, and merging while the broker is behind."""

from __future__ import annotations

import time

from rkllm_mqtt.bridge.streaming import ChunkStreamer
from rkllm_mqtt.payloads import StreamChunk


def collect(**kwargs: object) -> tuple[ChunkStreamer, list[StreamChunk]]:
    published: list[StreamChunk] = []
    streamer = ChunkStreamer("r1", published.append, **kwargs)  # type: ignore[arg-type]
    return streamer, published


def test_interval_zero_publishes_every_piece_with_gapless_seq() -> None:
    streamer, published = collect(interval_ms=0)
    for word in ["a ", "b ", "c "]:
        streamer.text(word)
    streamer.flush()
    assert [(c.seq, c.text) for c in published] == [(0, "a "), (1, "b "), (2, "c ")]


def test_coalescing_merges_text_within_the_interval_and_flushes_at_the_deadline() -> None:
    streamer, published = collect(interval_ms=200)
    streamer.text("first ")  # after a quiet stretch: out at once
    streamer.text("second ")
    streamer.text("third ")
    assert [c.text for c in published] == ["first "]
    deadline = streamer.flush_deadline()
    assert deadline is not None and deadline > time.monotonic()
    streamer.flush()
    assert [c.text for c in published] == ["first ", "second third "]
    assert [c.seq for c in published] == [0, 1]
    assert streamer.flush_deadline() is None


def test_congestion_holds_text_and_merges_it_without_loss() -> None:
    congested = {"on": False}
    streamer, published = collect(interval_ms=0, congested=lambda: congested["on"])
    streamer.text("one ")
    congested["on"] = True
    for word in ["two ", "three ", "four "]:
        streamer.text(word)
    assert len(published) == 1
    congested["on"] = False
    streamer.text("five ")
    streamer.flush()
    assert [c.text for c in published] == ["one ", "two three four five "]
    assert [c.seq for c in published] == [0, 1]


def test_disabled_stream_publishes_nothing() -> None:
    streamer, published = collect(interval_ms=0, enabled=False)
    streamer.text("hidden ")
    streamer.flush()
    assert published == []
