"""Home Assistant integration: MQTT discovery configs and the event entity's payload.

Everything here is a pure function of the settings (and the loaded model); the daemon publishes
the :class:`DiscoveryMessage` values it gets back.
"""

from __future__ import annotations

from .discovery import (
    DiscoveryMessage,
    discovery_messages,
    discovery_subscriptions,
    entity_configs,
    ha_event_payload,
    ha_event_topic,
    ha_status_topic,
    is_ha_online,
    is_own_config_topic,
    offered_config_topics,
    removal_messages,
    stale_config_removals,
)
from .models import EntityConfig, HomeAssistantEvent

__all__ = [
    "DiscoveryMessage",
    "EntityConfig",
    "HomeAssistantEvent",
    "discovery_messages",
    "discovery_subscriptions",
    "entity_configs",
    "ha_event_payload",
    "ha_event_topic",
    "ha_status_topic",
    "is_ha_online",
    "is_own_config_topic",
    "offered_config_topics",
    "removal_messages",
    "stale_config_removals",
]
