"""The stream sink: one message per token, coalescing, and merging while the broker is behind."""

from __future__ import annotations

import json

import pytest

from rkllm_mqtt.bridge.streaming import ChunkStreamer
from rkllm_mqtt.payloads import StreamChunk, stream_chunk_json, stream_chunk_prefix


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def collect(**kwargs: object) -> tuple[ChunkStreamer, list[StreamChunk]]:
    published: list[StreamChunk] = []

    def publish(payload: bytes) -> None:
        published.append(StreamChunk.model_validate_json(payload))

    streamer = ChunkStreamer("r1", publish, **kwargs)  # type: ignore[arg-type]
    return streamer, published


def test_interval_zero_publishes_every_piece_with_gapless_seq() -> None:
    streamer, published = collect(interval_ms=0)
    for word in ["a ", "b ", "c "]:
        streamer.text(word)
    streamer.flush()
    assert [(c.seq, c.text) for c in published] == [(0, "a "), (1, "b "), (2, "c ")]
    assert streamer.flush_deadline() is None


def test_coalescing_merges_text_within_the_interval_and_flushes_at_the_deadline() -> None:
    clock = Clock()
    streamer, published = collect(interval_ms=200, clock=clock)
    streamer.text("first ")  # after a quiet stretch: out at once
    clock.now += 0.05
    streamer.text("second ")
    clock.now += 0.05
    streamer.text("third ")
    assert [c.text for c in published] == ["first "]
    assert streamer.flush_deadline() == pytest.approx(100.2)
    clock.now = 100.2
    streamer.flush()  # what the run loop does at the deadline
    assert [c.text for c in published] == ["first ", "second third "]
    assert [c.seq for c in published] == [0, 1]
    assert streamer.flush_deadline() is None


def test_a_token_after_a_quiet_stretch_goes_out_at_once() -> None:
    clock = Clock()
    streamer, published = collect(interval_ms=200, clock=clock)
    streamer.text("one ")
    clock.now += 5.0
    streamer.text("two ")
    assert [c.text for c in published] == ["one ", "two "]


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


def test_text_held_by_congestion_goes_out_with_the_final_flush() -> None:
    streamer, published = collect(interval_ms=0, congested=lambda: True)
    streamer.text("held ")
    streamer.text("back")
    assert published == []
    streamer.flush()
    assert [(c.seq, c.text) for c in published] == [(0, "held back")]


def test_disabled_stream_publishes_nothing() -> None:
    streamer, published = collect(interval_ms=0, enabled=False)
    streamer.text("hidden ")
    streamer.flush()
    assert published == []


@pytest.mark.parametrize(
    "text", ["a ", "", 'quote " backslash \\ newline \n tab \t', "é ü 漢字 😀", "\u2028\u2029\x00\x1f", "</script>"]
)
@pytest.mark.parametrize("request_id", ["r1", "kitchen-42", "a.b:c_d-e"])
def test_chunk_json_is_what_the_model_would_publish(request_id: str, text: str) -> None:
    built = stream_chunk_json(stream_chunk_prefix(request_id), 7, text)
    model = StreamChunk(id=request_id, seq=7, text=text)
    assert json.loads(built) == json.loads(model.to_json())
    assert StreamChunk.model_validate_json(built) == model
