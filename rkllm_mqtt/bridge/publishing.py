"""What the bridge's publishing side needs of the MQTT transport, written once.

``bridge/transport.py``'s ``MqttTransport`` is the one implementation; the publisher and the retained finals each
depend on the narrow part they use, so a small fake can stand in for the transport in their tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Publish(Protocol):
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        on_acked: Callable[[], None] | None = None,
        handoff: str | None = None,
    ) -> object:
        """Publish one message; ``on_acked`` runs once the broker has it."""
        ...


class Publishing(Publish, Protocol):
    """The transport as the publisher drives it."""

    @property
    def backlog(self) -> int:
        """QoS 1 messages the broker has not acknowledged yet."""
        ...

    @property
    def unsent(self) -> int:
        """Packets (QoS 0 ones too) not yet written to the broker's connection."""
        ...


class ExpiringPublishing(Publish, Protocol):
    """The part of the transport that retained finals need."""

    @property
    def expires_messages(self) -> bool:
        """The connection is MQTT 5, so the broker honours a Message Expiry Interval."""
        ...
