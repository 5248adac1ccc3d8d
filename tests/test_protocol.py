"""The event pipe's framing, on a real pipe: frames split across reads, several frames in one read, end of file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from rkllm_mqtt.runtime.protocol import EventKind, EventReader, encode_event, encode_json_event


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_several_frames_in_one_read_and_a_frame_cut_in_two(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    reader = EventReader(read_fd)
    first = encode_event(EventKind.CHUNK, "héllo ".encode())
    second = encode_json_event(EventKind.RUN_RETURNED, {"ret": 0, "tokens": 2})
    os.write(write_fd, first + second[:3])  # the second frame's header is cut
    events = reader.read_ready()
    assert [(e.kind, e.payload) for e in events] == [(EventKind.CHUNK, "héllo ".encode())]
    os.write(write_fd, second[3:])
    (returned,) = reader.read_ready()
    assert returned.kind == EventKind.RUN_RETURNED
    assert returned.json() == {"ret": 0, "tokens": 2}
    assert not reader.eof


def test_end_of_file_is_reported(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    reader = EventReader(read_fd)
    os.write(write_fd, encode_event(EventKind.RUN_ERROR))
    os.close(write_fd)
    assert [e.kind for e in reader.read_ready()] == [EventKind.RUN_ERROR]
    assert reader.read_ready() == []
    assert reader.eof


def test_an_unknown_kind_is_refused(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"\x63\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="unknown event kind 99"):
        EventReader(read_fd).read_ready()
