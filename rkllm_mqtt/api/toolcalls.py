"""Tool calls in a model's text, in the two forms small RKLLM models write them.

- Qwen's (and Hermes'): ``<tool_call>{"name": "...", "arguments": {...}}</tool_call>``, the form Rockchip's
  own server demo parses;
- the XML-like form of Qwen3-Coder and others: ``<function=NAME><parameter=KEY>VALUE</parameter></function>``,
  sometimes inside ``<tool_call>…</tool_call>``.

Pure functions: text in, calls out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"

_FUNCTION_RE = re.compile(r"<function=([^>\s]+)\s*>(.*?)</function>", re.DOTALL)
_PARAMETER_RE = re.compile(r"<parameter=([^>\s]+)\s*>(.*?)</parameter>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def as_ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def _json_call(text: str) -> ToolCall | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments)


def _parameter_value(raw: str) -> Any:
    text = raw.strip("\n")
    stripped = text.strip()
    if stripped and stripped[0] in '{["-0123456789tfn':
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


def _function_calls(text: str) -> list[ToolCall]:
    calls = []
    for match in _FUNCTION_RE.finditer(text):
        arguments = {p.group(1): _parameter_value(p.group(2)) for p in _PARAMETER_RE.finditer(match.group(2))}
        calls.append(ToolCall(match.group(1), arguments))
    return calls


def parse_call_block(block: str) -> list[ToolCall] | None:
    """The calls in one block (``<tool_call>…</tool_call>`` or ``<function=…>…</function>``), None if malformed."""
    inner = block.strip()
    if inner.startswith(CALL_OPEN):
        inner = inner[len(CALL_OPEN) :]
        if inner.endswith(CALL_CLOSE):
            inner = inner[: -len(CALL_CLOSE)]
        inner = inner.strip()
        if not inner.startswith(FUNCTION_OPEN):
            call = _json_call(inner)
            return [call] if call is not None else None
    calls = _function_calls(inner)
    return calls or None
