"""Publishing a reply's text as stream chunks, optionally coalesced over ``stream_interval_ms``.

With an interval of 0 every piece of decoded text becomes one message. With an interval, text is
buffered and published at most once per interval; a token arriving after a quiet stretch longer
than the interval goes out at once, so coalescing never delays a slow stream. While the broker is behind
(``congested``), text is held and goes out merged with the next chunk: the stream keeps every byte, in order,
without an unbounded queue of messages.

This is the per-token path: a chunk's JSON is built from a prefix made once per request
(:func:`~rkllm_mqtt.payloads.stream_chunk_json`), not through a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rkllm_mqtt.payloads import stream_chunk_json, stream_chunk_prefix

PublishChunk = Callable[[bytes], None]


class ChunkStreamer:
    """One request's stream. Used from one thread only (the runtime's run loop)."""

    def __init__(
        self,
        request_id: str,
        publish: PublishChunk,
        *,
        interval_ms: int,
        enabled: bool = True,
        congested: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request_id = request_id
        self.publish = publish
        self.congested = congested or (lambda: False)
        self.interval_s = interval_ms / 1000.0
        self.enabled = enabled
        self.clock = clock
        self.seq = 0
        self._prefix = stream_chunk_prefix(request_id)
        self._buffer: list[str] = []
        self._last_flush = 0.0

    def text(self, chunk: str) -> None:
        if not self.enabled:
            return
        if self.congested():
            self._buffer.append(chunk)
            return  # held: it goes out merged with a later chunk, at the latest by flush() at the end
        if self.interval_s <= 0:
            if self._buffer:  # text held while the broker was behind goes first, merged
                self._buffer.append(chunk)
                self.flush()
            else:
                self._send(chunk)
            return
        self._buffer.append(chunk)
        if self.clock() - self._last_flush >= self.interval_s:
            self.flush()

    def flush_deadline(self) -> float | None:
        if not self._buffer or self.interval_s <= 0:
            return None
        return self._last_flush + self.interval_s

    def flush(self) -> None:
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        if self.interval_s > 0:
            self._last_flush = self.clock()
        self._send(text)

    def _send(self, text: str) -> None:
        self.publish(stream_chunk_json(self._prefix, self.seq, text))
        self.seq += 1
