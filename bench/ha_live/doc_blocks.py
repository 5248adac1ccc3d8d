"""The YAML examples of docs/home-assistant.md, taken out of the page as they stand, sorted by what they are.

The live run executes exactly these blocks, so the page and the run cannot drift apart: a block this module
does not know stops the run (and the unit test) until the run learns to execute it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "home-assistant.md"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```yaml[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


class Kind(Enum):
    ASK_SCRIPT = "the ask script (scripts.yaml)"
    ASK_USE = "actions that call the ask script and use the answer"
    AUTOMATION = "an automation"
    ACTION = "a single action"
    CARD = "a dashboard card"
    CONFIGURATION = "configuration.yaml settings"


@dataclass(frozen=True)
class Block:
    kind: Kind
    line: int
    text: str
    data: Any


class UnknownBlockError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML as Home Assistant reads it, with its tags kept as plain strings (the examples use none today)."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return f"{node.tag} {getattr(node, 'value', '')}"


_Loader.add_multi_constructor("!", lambda loader, suffix, node: _tagged(loader, node))


def _dedent(body: str, indent: str) -> str:
    return "".join(line[len(indent) :] if line.startswith(indent) else line for line in body.splitlines(True))


def classify(data: Any) -> Kind | None:
    if isinstance(data, dict):
        if "ask_llm" in data:
            return Kind.ASK_SCRIPT
        if "triggers" in data and "actions" in data:
            return Kind.AUTOMATION
        if "action" in data:
            return Kind.ACTION
        if "type" in data:
            return Kind.CARD
        if set(data) <= {"recorder", "logger", "homeassistant"}:
            return Kind.CONFIGURATION
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("action") == "script.ask_llm":
        return Kind.ASK_USE
    return None


def blocks(doc: Path = DOC) -> list[Block]:
    """Every ```yaml block of the page, in order; UnknownBlockError names the first one no kind fits."""
    text = doc.read_text(encoding="utf-8")
    found: list[Block] = []
    for match in _FENCE.finditer(text):
        body = _dedent(match.group("body"), match.group("indent"))
        line = text.count("\n", 0, match.start()) + 1
        data = yaml.load(body, Loader=_Loader)  # a SafeLoader subclass
        kind = classify(data)
        if kind is None:
            raise UnknownBlockError(f"{doc.name} line {line}: a YAML block the live run does not know how to execute")
        found.append(Block(kind, line, body, data))
    return found


def only(found: list[Block], kind: Kind) -> Block:
    """The one block of ``kind``; the run's scenarios rely on there being exactly one."""
    matching = [block for block in found if block.kind is kind]
    if len(matching) != 1:
        raise UnknownBlockError(f"expected one block of {kind.value}, found {len(matching)}")
    return matching[0]
