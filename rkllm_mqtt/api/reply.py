"""Splitting a model's streamed reply into thinking, answer text and tool calls.

Text arrives in pieces that may cut a tag in two (``<tool_`` + ``call>``). The splitter holds back only the
tail that could still become a tag, so plain answers stream with no delay, while tool calls and a leading
``<think>…</think>`` block never reach the client as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rkllm_mqtt.api.toolcalls import CALL_CLOSE, CALL_OPEN, FUNCTION_CLOSE, FUNCTION_OPEN, ToolCall, parse_call_block

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_CALL_OPENERS = (CALL_OPEN, FUNCTION_OPEN)
_CLOSER_FOR = {CALL_OPEN: CALL_CLOSE, FUNCTION_OPEN: FUNCTION_CLOSE}


@dataclass
class Pieces:
    """What one step of the splitter releases."""

    text: str = ""
    thinking: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.thinking or self.calls)


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is the start of one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


class ReplySplitter:
    """Feed it the reply piece by piece; it releases answer text, thinking text and finished tool calls."""

    def __init__(self, *, parse_tools: bool) -> None:
        self.parse_tools = parse_tools
        self._buffer = ""
        self._mode = "start"  # start → (thinking →) text ⇄ call
        self._closer = ""
        self._strip_lead = False  # after </think> or a call, leading whitespace is markup
        self.calls: list[ToolCall] = []
        self.text = ""
        self.thinking = ""

    def feed(self, chunk: str) -> Pieces:
        self._buffer += chunk
        out = Pieces()
        self._advance(out, final=False)
        return out

    def finish(self) -> Pieces:
        out = Pieces()
        self._advance(out, final=True)
        if self._mode == "call":
            # Cut off inside a call (max_new_tokens): parse what is there, else it was text after all.
            calls = parse_call_block(self._buffer + self._closer)
            if calls:
                self._add_calls(out, calls)
            else:
                self._add_text(out, self._buffer)
        elif self._mode == "thinking":
            self._add_thinking(out, self._buffer)
        else:
            self._add_text(out, self._buffer)
        self._buffer = ""
        return out

    def _add_text(self, out: Pieces, text: str) -> None:
        if text:
            out.text += text
            self.text += text

    def _add_thinking(self, out: Pieces, text: str) -> None:
        if text:
            out.thinking += text
            self.thinking += text

    def _add_calls(self, out: Pieces, calls: list[ToolCall]) -> None:
        out.calls.extend(calls)
        self.calls.extend(calls)

    def _advance(self, out: Pieces, *, final: bool) -> None:
        while True:
            if self._mode == "start":
                lead = self._buffer.lstrip()
                if lead.startswith(THINK_OPEN):
                    self._buffer = lead[len(THINK_OPEN) :]
                    self._mode = "thinking"
                elif not final and THINK_OPEN.startswith(lead):
                    return  # still could be "<think>": wait for more
                else:
                    self._mode = "text"
            elif self._mode == "thinking":
                end = self._buffer.find(THINK_CLOSE)
                if end < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, (THINK_CLOSE,))
                    self._add_thinking(out, self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._add_thinking(out, self._buffer[:end])
                self._buffer = self._buffer[end + len(THINK_CLOSE) :]
                self._strip_lead = True
                self._mode = "text"
            elif self._mode == "text":
                if self._strip_lead:
                    self._buffer = self._buffer.lstrip()
                    if not self._buffer:
                        return
                    self._strip_lead = False
                if not self.parse_tools:
                    self._add_text(out, self._buffer)
                    self._buffer = ""
                    return
                starts = [(self._buffer.find(m), m) for m in _CALL_OPENERS if m in self._buffer]
                if not starts:
                    keep = 0 if final else _partial_suffix(self._buffer, _CALL_OPENERS)
                    self._add_text(out, self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                index, opener = min(starts)
                before = self._buffer[:index]
                # Whitespace between calls (or before the first) is markup, not an answer.
                if before.strip():
                    self._add_text(out, before)
                self._buffer = self._buffer[index:]
                self._closer = _CLOSER_FOR[opener]
                self._mode = "call"
            else:  # call
                end = self._buffer.find(self._closer)
                if end < 0:
                    return
                block = self._buffer[: end + len(self._closer)]
                calls = parse_call_block(block)
                if calls:
                    self._add_calls(out, calls)
                else:
                    self._add_text(out, block)
                self._buffer = self._buffer[end + len(self._closer) :]
                self._strip_lead = True
                self._mode = "text"
