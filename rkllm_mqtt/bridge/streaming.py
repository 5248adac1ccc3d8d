"""Publishing a reply's text as stream chunks, optionally coalesced over ``stream_interval_ms``.

With an interval of 0 every piece of decoded text becomes one message. With an interval, text is
buffered and published at most once per interval; a token arriving after a quiet stretch longer
than the interval goes out at once, so coalescing never delays a slow stream. While the broker is behind
(``congested``), text is held and goes out merged with the next chunk: the stream keeps every byte, in order,
without an unbounded queue of messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rkllm_mqtt.payloads import StreamChunk

PublishChunk = Callable[[StreamChunk], None]


class ChunkStreamer:
    """The supervisor's stream sink for one request. Used from one thread only."""

    def __init__(
        self,
        request_id: str,
        publish: PublishChunk,
        *,
        interval_ms: int,
        enabled: bool = True,
        congested: Callable[[], bool] | None = None,
    ) -> None:
        self.request_id = request_id
        self.publish = publish
        self.congested = congested or (lambda: False)
        self.interval_s = interval_ms / 1000.0
        self.enabled = enabled
        self.seq = 0
        self._buffer: list[str] = []
        self._last_flush = 0.0

    def text(self, chunk: str) -> None:
        if not self.enabled:
            return
        self._buffer.append(chunk)
        if self.congested():
            return  # held: it goes out merged with a later chunk, at the latest by flush() at the end
        if self.interval_s <= 0 or time.monotonic() - self._last_flush >= self.interval_s:
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
        self._last_flush = time.monotonic()
        self.publish(StreamChunk(id=self.request_id, seq=self.seq, text=text))
        self.seq += 1
