"""Cluster mode: which peer node can take a group request this node cannot start at once.

Group requests arrive through a shared subscription, and the broker picks a node blind to load
(Mosquitto: strict round robin). A node that is busy hands such a request on to a peer whose
retained ``state`` says idle and whose ``availability`` says online; it never hands on a request
that was addressed to it directly, so a request moves at most once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rkllm_mqtt.topics import Topics

# After handing a request to a peer, treat it as busy until its own state says otherwise.
_CLAIM_S = 5.0


@dataclass
class _Peer:
    online: bool = False
    idle: bool = False
    claimed_until: float = 0.0


class PeerTable:
    """What this node knows of its peers, from their retained ``state`` and ``availability``."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._peers: dict[str, _Peer] = {}

    def subscriptions(self) -> list[str]:
        return [f"{self.topics.base}/+/state", f"{self.topics.base}/+/availability"]

    def _node_of(self, topic: str, leaf: str) -> str | None:
        parts = topic.split("/")
        base_levels = self.topics.base.count("/") + 1
        if len(parts) != base_levels + 2 or parts[-1] != leaf or "/".join(parts[:base_levels]) != self.topics.base:
            return None
        node = parts[base_levels]
        return None if node == self.topics.node else node

    def observe(self, topic: str, payload: bytes) -> bool:
        """Record a peer's state or availability; True when the message was one of those."""
        node = self._node_of(topic, "availability")
        if node is not None:
            self._peers.setdefault(node, _Peer()).online = payload == b"online"
            return True
        node = self._node_of(topic, "state")
        if node is None:
            return False
        try:
            state = json.loads(payload) if payload else {}
        except (ValueError, RecursionError):  # anyone may publish a "state": deep nesting must not raise
            return True
        peer = self._peers.setdefault(node, _Peer())
        peer.idle = isinstance(state, dict) and state.get("status") == "idle" and not state.get("queue_depth")
        if not peer.idle:
            peer.claimed_until = 0.0
        return True

    def pick_idle(self, now: float | None = None) -> str | None:
        """An online, idle peer not recently handed a request, claimed for the next few seconds."""
        now = time.monotonic() if now is None else now
        for node, peer in sorted(self._peers.items()):
            if peer.online and peer.idle and peer.claimed_until <= now:
                peer.claimed_until = now + _CLAIM_S
                return node
        return None
