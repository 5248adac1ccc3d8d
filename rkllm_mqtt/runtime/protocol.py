"""What the parent and the worker process say to each other.

Commands go down the worker's stdin as JSON lines: they are rare and small. Events come back on a
dedicated pipe as binary frames (1-byte kind, 4-byte length, payload) because token chunks are
frequent and must cost the runtime's callback thread one ``os.write`` and nothing else. A frame
below PIPE_BUF bytes is written atomically, so frames from the callback thread and the worker's
main thread never interleave.
"""

from __future__ import annotations

import json
import os
import struct
from enum import IntEnum
from typing import Any, NamedTuple

HEADER = struct.Struct("!BI")

# The line the worker prints once rkllm_init has returned and the C streams are flushed: every line the
# runtime printed during rkllm_init (its version line among them) came before it, on the same pipe.
INIT_OUTPUT_END = "rkllm-mqtt worker: end of rkllm_init output"


class EventKind(IntEnum):
    READY = 1  # model loaded: JSON model info
    INIT_FAILED = 2  # JSON {"stage", "message"}; the worker exits after it
    CHUNK = 3  # raw text bytes of one callback (may end inside a UTF-8 character)
    FINISH = 4  # JSON perf stats, from the FINISH callback
    RUN_ERROR = 5  # the ERROR callback (state 3)
    CAP_REACHED = 6  # the token cap the parent asked the worker to enforce was reached
    RUN_RETURNED = 7  # JSON {"ret", "message"}: rkllm_run returned; the runtime is free again


class Event(NamedTuple):
    """One frame. ``kind`` is an EventKind value; a plain tuple because one is made per token."""

    kind: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.payload.decode("utf-8")) if self.payload else {}
        if not isinstance(data, dict):
            raise ValueError("event payload is not a JSON object")
        return data


_KINDS = frozenset(int(kind) for kind in EventKind)


def encode_event(kind: EventKind, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def encode_json_event(kind: EventKind, data: dict[str, Any]) -> bytes:
    return encode_event(kind, json.dumps(data, separators=(",", ":")).encode("utf-8"))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class EventReader:
    """Splits the bytes of the event pipe into frames.

    ``read_ready()`` does one ``os.read`` (call it when the pipe is readable: poll said so) and returns every
    frame that is complete; a frame cut by the read waits in the buffer for the rest. ``eof`` turns True when
    the worker's end is closed (it exited or was killed).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.eof = False
        self._buffer = b""

    def read_ready(self) -> list[Event]:
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return []
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        at, size = 0, len(buffer)
        while size - at >= HEADER.size:
            kind, length = HEADER.unpack_from(buffer, at)
            end = at + HEADER.size + length
            if end > size:
                break
            if kind not in _KINDS:
                raise ValueError(f"unknown event kind {kind} from the worker")
            events.append(Event(kind, buffer[at + HEADER.size : end]))
            at = end
        self._buffer = buffer[at:]
        return events


def encode_command(op: str, **fields: Any) -> bytes:
    return (json.dumps({"op": op, **fields}, separators=(",", ":")) + "\n").encode("utf-8")
