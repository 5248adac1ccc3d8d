"""Home Assistant MQTT discovery as pure functions from settings (and the loaded model) to messages.

One retained config per entity at ``{discovery_prefix}/<platform>/{node_id}/<object_id>/config``.
Nothing here touches the network: the daemon publishes what these functions return, subscribes to
:func:`discovery_subscriptions` on start to collect the retained configs under this node, and
clears the stale ones with :func:`stale_config_removals`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import get_args

from rkllm_mqtt import DISTRIBUTION, __version__
from rkllm_mqtt.payloads import BridgeStatus, FinalResponse, ModelInfo
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import Topics

from .models import (
    HA_STATE_MAX_LEN,
    Availability,
    BinarySensorConfig,
    ButtonConfig,
    Device,
    EntityConfig,
    EventConfig,
    HaEventType,
    HomeAssistantEvent,
    NotifyConfig,
    Origin,
    Platform,
    SensorConfig,
    TextConfig,
)

ORIGIN_NAME = "rkllm-mqtt"
MANUFACTURER = "rkllm-mqtt"
EVENT_TYPES: tuple[HaEventType, ...] = get_args(HaEventType)
HA_ONLINE = b"online"

_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class DiscoveryMessage:
    """One message to publish. An empty payload on a retained config topic removes the entity."""

    topic: str
    payload: bytes
    retain: bool = True


def ha_status_topic(settings: Settings) -> str:
    """Where Home Assistant announces ``online`` (``homeassistant.status_topic``); discovery is published again."""
    return settings.homeassistant.status_topic


def is_ha_online(payload: bytes) -> bool:
    """True for Home Assistant's birth message on :func:`ha_status_topic`."""
    return payload.strip() == HA_ONLINE


def ha_event_topic(settings: Settings) -> str:
    """``{base}/{node}/event``: not retained, one :class:`HomeAssistantEvent` per final response."""
    return _topics(settings).event


def discovery_subscriptions(settings: Settings) -> list[str]:
    """The filters that match every config this node may have left retained, offered or not."""
    return [f"{settings.homeassistant.discovery_prefix}/+/{settings.mqtt.node_id}/+/config"]


def is_own_config_topic(settings: Settings, topic: str) -> bool:
    """True when ``topic`` is a discovery config topic of this node (matched level by level)."""
    levels = topic.split("/")
    prefix = settings.homeassistant.discovery_prefix.split("/")
    rest = levels[len(prefix) :]
    return (
        levels[: len(prefix)] == prefix
        and len(rest) == 4
        and rest[0] != ""
        and rest[1] == settings.mqtt.node_id
        and rest[2] != ""
        and rest[3] == "config"
    )


def discovery_messages(settings: Settings, model: ModelInfo | None) -> list[DiscoveryMessage]:
    """One retained config per entity; empty when Home Assistant discovery is disabled."""
    if not settings.homeassistant.enabled:
        return []
    return [
        DiscoveryMessage(_config_topic(settings, config.platform, object_id), config.to_json())
        for object_id, config in entity_configs(settings, model)
    ]


def offered_config_topics(settings: Settings) -> set[str]:
    """Every config topic this node offers (whether discovery is enabled or not)."""
    return {_config_topic(settings, config.platform, object_id) for object_id, config in entity_configs(settings, None)}


def removal_messages(settings: Settings) -> list[DiscoveryMessage]:
    """An empty retained payload for every config this node offers, so its device disappears."""
    return [DiscoveryMessage(topic, b"") for topic in sorted(offered_config_topics(settings))]


def stale_config_removals(settings: Settings, retained_topics: Iterable[str]) -> list[DiscoveryMessage]:
    """Empty retained payloads for this node's retained configs that are not offered any more.

    ``retained_topics`` are the topics of the retained messages seen on
    :func:`discovery_subscriptions`; topics of other nodes, or not config topics at all, are left
    alone. With discovery disabled nothing is offered, so every retained config found is stale.
    """
    offered = offered_config_topics(settings) if settings.homeassistant.enabled else set()
    stale = {topic for topic in retained_topics if is_own_config_topic(settings, topic) and topic not in offered}
    return [DiscoveryMessage(topic, b"") for topic in sorted(stale)]


def ha_event_payload(final: FinalResponse) -> HomeAssistantEvent:
    """The event entity's payload for one final response."""
    event_type: HaEventType
    if final.state == "done":
        event_type = "done"
    elif final.state == "aborted":
        event_type = "aborted"
    else:
        event_type = "error"
    error_code = None
    if final.state != "done":
        if final.error is not None:
            error_code = final.error.code
        elif final.state in ("timeout", "aborted"):
            error_code = final.state
        else:
            error_code = "runtime_error"
    return HomeAssistantEvent(
        event_type=event_type,
        id=final.id,
        text=final.text,
        finish_reason=final.finish_reason,
        error_code=error_code,
        ts=final.ts,
    )


def entity_configs(settings: Settings, model: ModelInfo | None) -> list[tuple[str, EntityConfig]]:
    """``(object_id, config)`` for every entity of this node, validated by the typed models."""
    ctx = _context(settings, model)
    return [
        (entity.object_id, entity.config.model_validate({**ctx.common(entity), **entity.options(ctx)}))
        for entity in _ENTITIES
    ]


# --- building blocks -------------------------------------------------------------------------


def _topics(settings: Settings) -> Topics:
    return Topics(settings.mqtt.base_topic, settings.mqtt.node_id)


def _config_topic(settings: Settings, platform: Platform, object_id: str) -> str:
    return f"{settings.homeassistant.discovery_prefix}/{platform}/{settings.mqtt.node_id}/{object_id}/config"


def _slug(text: str) -> str:
    """Lower-case letters, digits and single underscores: what Home Assistant allows in an entity id."""
    return _SLUG_UNSAFE.sub("_", text.lower()).strip("_") or "node"


@lru_cache(maxsize=1)
def _support_url() -> str | None:
    """The project's home page from the installed package's metadata (``[project.urls]``), if any."""
    try:
        urls = metadata.metadata(DISTRIBUTION).get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    found: dict[str, str] = {}
    for entry in urls:
        label, _, url = entry.partition(",")
        url = url.strip()
        if url.startswith(("https://", "http://")):
            found[label.strip().lower()] = url
    for label in ("issues", "bug tracker", "support", "homepage", "source", "repository"):
        if label in found:
            return found[label]
    return next(iter(found.values()), None)


@dataclass(frozen=True)
class _Context:
    """What every entity config of one node shares."""

    topics: Topics
    event_topic: str
    node: str
    node_slug: str
    device: Device
    origin: Origin
    availability: list[Availability]

    def common(self, entity: _Entity) -> dict[str, object]:
        return {
            "name": entity.name,
            "unique_id": f"rkllm_mqtt_{self.node}_{entity.object_id}",
            "default_entity_id": f"{entity.config.platform}.rkllm_{self.node_slug}_{entity.object_id}",
            "device": self.device,
            "origin": self.origin,
            "availability": self.availability,
        }


def _context(settings: Settings, model: ModelInfo | None) -> _Context:
    node = settings.mqtt.node_id
    topics = _topics(settings)
    return _Context(
        topics=topics,
        event_topic=ha_event_topic(settings),
        node=node,
        node_slug=_slug(node),
        device=Device(
            identifiers=[f"rkllm_mqtt_{node}"],
            name=settings.homeassistant.device_name or f"RKLLM {node}",
            manufacturer=MANUFACTURER,
            model=model.model_name if model is not None and model.model_name else "unknown",
            sw_version=__version__,
            hw_version=model.runtime_version if model is not None else None,
        ),
        origin=Origin(name=ORIGIN_NAME, sw_version=__version__, support_url=_support_url()),
        availability=[Availability(topic=topics.availability)],
    )


def _cut(expression: str) -> str:
    """A template rendering ``expression`` cut to Home Assistant's state length limit."""
    return f"{{{{ ({expression})[:{HA_STATE_MAX_LEN}] }}}}"


# The final response carries a field called "state", a name Home Assistant refuses as an attribute,
# so the attributes are picked and renamed here.
_LAST_ATTRIBUTES = (
    "{{ {"
    "'id': value_json.id, "
    "'final_state': value_json.state, "
    "'text': value_json.text, "
    "'finish_reason': value_json.finish_reason, "
    "'error': value_json.error, "
    "'usage': value_json.usage, "
    "'timing': value_json.timing, "
    "'session': value_json.get('session'), "
    "'model': value_json.get('model'), "
    "'node': value_json.get('node')"
    "} | tojson }}"
)

_BUSY_ATTRIBUTES = "{{ {'request_id': value_json.request_id, 'queue_depth': value_json.queue_depth} | tojson }}"


@dataclass(frozen=True)
class _Entity:
    """One entity: its config model, object id (the fourth topic level), name and own options."""

    config: type[EntityConfig]
    object_id: str
    name: str
    options: Callable[[_Context], dict[str, object]]


# Token chunks never become an entity: one state write per token would flood the recorder.
_ENTITIES: tuple[_Entity, ...] = (
    _Entity(
        TextConfig,
        "prompt",
        "Prompt",
        lambda ctx: {
            "command_topic": ctx.topics.prompt,
            "min": 1,
            "max": HA_STATE_MAX_LEN,
            "mode": "text",
            "qos": 1,
            "icon": "mdi:message-text",
        },
    ),
    _Entity(
        NotifyConfig,
        "ask",
        "Ask",
        lambda ctx: {"command_topic": ctx.topics.prompt, "qos": 1, "icon": "mdi:send"},
    ),
    _Entity(
        SensorConfig,
        "status",
        "Status",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.status }}",
            "device_class": "enum",
            "options": list(get_args(BridgeStatus)),
            "icon": "mdi:robot",
        },
    ),
    _Entity(
        SensorConfig,
        "last_response",
        "Last response",
        lambda ctx: {
            "state_topic": ctx.topics.last,
            "value_template": _cut("value_json.text"),
            "json_attributes_topic": ctx.topics.last,
            "json_attributes_template": _LAST_ATTRIBUTES,
            "icon": "mdi:message-reply-text",
        },
    ),
    _Entity(
        SensorConfig,
        "tokens_per_second",
        "Tokens per second",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.tokens_per_s }}",
            "state_class": "measurement",
            "unit_of_measurement": "tok/s",
            "suggested_display_precision": 1,
            "icon": "mdi:speedometer",
        },
    ),
    _Entity(
        SensorConfig,
        "time_to_first_token",
        "Time to first token",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.ttft_ms }}",
            "device_class": "duration",
            "state_class": "measurement",
            "unit_of_measurement": "ms",
            "suggested_display_precision": 0,
        },
    ),
    _Entity(
        SensorConfig,
        "queue_depth",
        "Queue depth",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.queue_depth }}",
            "state_class": "measurement",
            "suggested_display_precision": 0,
            "icon": "mdi:format-list-numbered",
        },
    ),
    _Entity(
        SensorConfig,
        "requests_total",
        "Requests total",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.requests_total }}",
            "state_class": "total_increasing",
            "entity_category": "diagnostic",
            "icon": "mdi:counter",
        },
    ),
    _Entity(
        SensorConfig,
        "errors_total",
        "Errors total",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ value_json.errors_total }}",
            "state_class": "total_increasing",
            "entity_category": "diagnostic",
            "icon": "mdi:alert-octagon-outline",
        },
    ),
    _Entity(
        SensorConfig,
        "model",
        "Model",
        lambda ctx: {
            "state_topic": ctx.topics.model,
            "value_template": _cut("value_json.model_name"),
            "json_attributes_topic": ctx.topics.model,
            "entity_category": "diagnostic",
            "icon": "mdi:brain",
        },
    ),
    _Entity(
        SensorConfig,
        "last_error",
        "Last error",
        lambda ctx: {
            "state_topic": ctx.topics.health,
            "value_template": _cut("value_json.last_error or 'none'"),
            "entity_category": "diagnostic",
            "icon": "mdi:alert-circle-outline",
        },
    ),
    _Entity(
        BinarySensorConfig,
        "busy",
        "Busy",
        lambda ctx: {
            "state_topic": ctx.topics.state,
            "value_template": "{{ 'ON' if value_json.status == 'busy' else 'OFF' }}",
            "json_attributes_topic": ctx.topics.state,
            "json_attributes_template": _BUSY_ATTRIBUTES,
            "device_class": "running",
        },
    ),
    _Entity(
        BinarySensorConfig,
        "problem",
        "Problem",
        lambda ctx: {
            "state_topic": ctx.topics.health,
            "value_template": "{{ 'OFF' if value_json.status == 'ok' else 'ON' }}",
            "json_attributes_topic": ctx.topics.health,
            "device_class": "problem",
            "entity_category": "diagnostic",
        },
    ),
    _Entity(
        ButtonConfig,
        "abort",
        "Abort",
        lambda ctx: {
            "command_topic": ctx.topics.abort,
            # Empty: abort what is running. A non-empty payload would be read as a request id.
            "payload_press": "",
            "qos": 1,
            "icon": "mdi:stop-circle-outline",
        },
    ),
    _Entity(
        ButtonConfig,
        "clear_history",
        "Clear history",
        lambda ctx: {
            "command_topic": ctx.topics.clear,
            # Empty: forget the conversation. A non-empty payload would be read as a session id.
            "payload_press": "",
            "qos": 1,
            "icon": "mdi:broom",
        },
    ),
    _Entity(
        EventConfig,
        "response",
        "Response",
        lambda ctx: {
            "state_topic": ctx.event_topic,
            "event_types": list(EVENT_TYPES),
            "icon": "mdi:message-reply-text-outline",
        },
    ),
)
