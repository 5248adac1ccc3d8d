"""Topic names of the contract (docs/topics.md), in one place."""

from __future__ import annotations

from dataclasses import dataclass


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
