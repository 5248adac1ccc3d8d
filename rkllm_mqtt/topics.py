"""Topic names of the contract (docs/topics.md), in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

# MQTT encodes a topic name with a 16-bit length.
MQTT_MAX_TOPIC_BYTES = 65535
# Brokers limit the levels of a topic: Mosquitto 2.0 closes the connection on a PUBLISH to a topic of more than 201
# levels, and EMQX refuses more than its max_topic_levels (default 128). The bridge keeps within the lower one.
MAX_TOPIC_LEVELS = 128


def _refused_characters() -> re.Pattern[str]:
    """NUL, the C0 and C1 control characters, surrogates and the Unicode non-characters, as one character class.

    MQTT (section 1.5.4) forbids them in a UTF-8 string, and Mosquitto answers a topic holding one with "malformed
    packet" and closes the connection. A lone surrogate cannot even be encoded as UTF-8.
    """
    spans = [(0x00, 0x1F), (0x7F, 0x9F), (0xD800, 0xDFFF), (0xFDD0, 0xFDEF)]
    spans += [(plane * 0x10000 + 0xFFFE, plane * 0x10000 + 0xFFFF) for plane in range(17)]
    return re.compile("[" + "".join(f"{chr(low)}-{chr(high)}" for low, high in spans) + "]")


_REFUSED_CHARACTER = _refused_characters()


def _character_kind(char: str) -> str:
    code = ord(char)
    if code == 0:
        return "NUL"
    if code <= 0x9F:
        return "a control character"
    if 0xD800 <= code <= 0xDFFF:
        return "a lone surrogate"
    return "a Unicode non-character"


def topic_name_problem(topic: str, *, max_bytes: int = MQTT_MAX_TOPIC_BYTES) -> str | None:
    """Why ``topic`` is not a topic name a broker takes in a PUBLISH, or None when it is one.

    Beyond MQTT's own rules (no wildcard, valid UTF-8, 65,535 bytes), a name starting with ``$`` is refused
    (brokers keep those for themselves) and ``max_bytes`` may set a lower cap. The answer reads after the topic:
    "reply topic 'x' <problem>"; it never repeats the topic itself.
    """
    limit = min(max_bytes, MQTT_MAX_TOPIC_BYTES)
    if not topic:
        return "is empty"
    # Characters are never more than their bytes: a long string is refused before it is scanned or encoded.
    if len(topic) > limit:
        return f"is longer than {limit} bytes"
    refused = _REFUSED_CHARACTER.search(topic)
    if refused is not None:
        char = refused.group()
        kind = _character_kind(char)
        return f"has {kind} (U+{ord(char):04X}) at position {refused.start()}, which no topic may contain"
    if "+" in topic or "#" in topic:
        return "has a wildcard ('+' or '#'), which only subscriptions may use"
    if topic.startswith("$"):
        return "starts with '$', which brokers keep for their own topics"
    size = len(topic.encode("utf-8"))
    if size > limit:
        return f"is {size} bytes long in UTF-8; the limit is {limit}"
    levels = topic.count("/") + 1
    if levels > MAX_TOPIC_LEVELS:
        return f"has {levels} levels; the limit is {MAX_TOPIC_LEVELS}"
    return None


@dataclass(frozen=True)
class Topics:
    """Every topic of one node: ``{base}/{node}/...``."""

    base: str
    node: str

    @property
    def root(self) -> str:
        return f"{self.base}/{self.node}"

    @property
    def availability(self) -> str:
        return f"{self.root}/availability"

    @property
    def prompt(self) -> str:
        return f"{self.root}/prompt"

    @property
    def group_prompt(self) -> str:
        return f"{self.base}/prompt"

    def shared_group_prompt(self, group: str) -> str:
        return f"$share/{group}/{self.base}/prompt"

    @property
    def abort(self) -> str:
        return f"{self.root}/abort"

    @property
    def clear(self) -> str:
        return f"{self.root}/clear"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    @property
    def model(self) -> str:
        return f"{self.root}/model"

    @property
    def error(self) -> str:
        return f"{self.root}/error"

    @property
    def last(self) -> str:
        return f"{self.root}/last"

    @property
    def event(self) -> str:
        """Home Assistant's event entity: one non-retained message per final response."""
        return f"{self.root}/event"

    def fixed(self) -> tuple[str, ...]:
        """Every topic of this node whose name does not depend on a request."""
        return (
            self.availability,
            self.prompt,
            self.abort,
            self.clear,
            self.state,
            self.health,
            self.model,
            self.error,
            self.last,
            self.event,
        )

    def response(self, request_id: str) -> str:
        return f"{self.root}/response/{request_id}"


@dataclass(frozen=True)
class ReplyTopics:
    """Where everything about one request goes: the final response, its stream and its status."""

    final: str

    @property
    def stream(self) -> str:
        return f"{self.final}/stream"

    @property
    def status(self) -> str:
        return f"{self.final}/status"


def is_under(topic: str, prefix: str) -> bool:
    """True when ``topic`` is ``prefix`` or below it, by whole topic levels."""
    prefix = prefix.rstrip("/")
    return topic == prefix or topic.startswith(prefix + "/")
