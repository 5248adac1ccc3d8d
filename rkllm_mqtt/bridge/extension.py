"""How an extension (Home Assistant discovery, and whatever comes next) plugs into the MQTT door.

An extension subscribes to its own topics, hears the door's events and publishes through the host it is given at
``start``. Every call except ``on_final`` comes on the door's dispatcher thread, one at a time, so an extension
needs no lock for its own state; it must not block. Work for later is a deadline on that same thread
(``host.call_later``), never a thread of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rkllm_mqtt.bridge.dispatcher import Deadline
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.payloads import FinalResponse, ModelInfo


class ExtensionHost(Protocol):
    """What the MQTT door offers an extension."""

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None: ...

    def call_later(self, delay_s: float, action: Callable[[], None]) -> Deadline:
        """Run ``action`` on the dispatcher thread after ``delay_s`` seconds."""
        ...

    def model_info(self) -> ModelInfo | None: ...

    def republish_status(self) -> None:
        """Publish the node's retained status (health, state, model, last) again."""
        ...


class Extension(Protocol):
    def subscriptions(self) -> list[str]:
        """Topic filters the door subscribes to for this extension."""
        ...

    def start(self, host: ExtensionHost) -> None: ...

    def stop(self) -> None: ...

    def on_connected(self) -> None:
        """The door is (again) connected to the broker."""
        ...

    def on_message(self, message: IncomingMessage) -> bool:
        """A message the door did not route itself; True when it was this extension's."""
        ...

    def on_runtime_change(self) -> None:
        """The runtime's status or model changed."""
        ...

    def on_final(self, final: FinalResponse) -> None:
        """A final response was published. Called on whichever thread finished the request: thread-safe, quick."""
        ...
