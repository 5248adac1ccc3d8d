"""Typed Home Assistant MQTT discovery configs and the event payload.

Keys are Home Assistant's full names (``command_topic``, not ``cmd_t``): a discovery config is read
by people debugging an installation far more often than it is sent over a slow link. Every model
forbids unknown fields, so a misspelled key fails here instead of being silently ignored by Home
Assistant. Configs are dumped with ``exclude_none``: an unset option is left to Home Assistant's
default rather than sent as ``null``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from rkllm_mqtt.errors import ErrorCode
from rkllm_mqtt.payloads import FinishReason

Platform = Literal["binary_sensor", "button", "event", "notify", "sensor", "text"]
EntityCategory = Literal["config", "diagnostic"]
StateClass = Literal["measurement", "total", "total_increasing"]
HaEventType = Literal["done", "error", "aborted"]

# Home Assistant refuses a state longer than this many characters.
HA_STATE_MAX_LEN = 255

# Home Assistant's entity id rule: lower-case letters, digits and single underscores, no leading or
# trailing underscore, on both sides of the dot.
ENTITY_ID_PATTERN = r"^(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)$"


class _Config(BaseModel):
    # Python's engine: the entity id rule needs look-arounds, which the default engine lacks.
    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Device(_Config):
    """The ``device`` block: ties every entity of one node to one Home Assistant device."""

    identifiers: list[str] = Field(min_length=1)
    name: str
    manufacturer: str
    model: str
    sw_version: str
    hw_version: str | None = None


class Origin(_Config):
    """The ``origin`` block: which software published the config (shown in Home Assistant's logs)."""

    name: str
    sw_version: str
    support_url: str | None = Field(None, pattern=r"^https?://")


class Availability(_Config):
    topic: str
    payload_available: str = "online"
    payload_not_available: str = "offline"


class EntityConfig(_Config):
    """Options every discovered entity of this bridge carries."""

    platform: ClassVar[Platform]

    name: str
    unique_id: str
    default_entity_id: str = Field(pattern=ENTITY_ID_PATTERN)
    device: Device
    origin: Origin
    availability: list[Availability] = Field(min_length=1)
    icon: str | None = Field(None, pattern=r"^[a-z]+:[a-z0-9-]+$")
    entity_category: EntityCategory | None = None
    enabled_by_default: bool | None = None
    json_attributes_topic: str | None = None
    json_attributes_template: str | None = None


class SensorConfig(EntityConfig):
    platform: ClassVar[Platform] = "sensor"

    state_topic: str
    value_template: str | None = None
    device_class: str | None = None
    state_class: StateClass | None = None
    unit_of_measurement: str | None = None
    suggested_display_precision: int | None = Field(None, ge=0)
    options: list[str] | None = None


class BinarySensorConfig(EntityConfig):
    platform: ClassVar[Platform] = "binary_sensor"

    state_topic: str
    value_template: str | None = None
    device_class: str | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"


class CommandConfig(EntityConfig):
    """Options of an entity through which Home Assistant publishes to the bridge."""

    command_topic: str
    qos: Literal[0, 1, 2] | None = None
    retain: bool = False


class ButtonConfig(CommandConfig):
    platform: ClassVar[Platform] = "button"

    # Always sent, also when empty: Home Assistant's default is "PRESS".
    payload_press: str


class TextConfig(CommandConfig):
    platform: ClassVar[Platform] = "text"

    min: int = Field(0, ge=0, le=HA_STATE_MAX_LEN)
    max: int = Field(HA_STATE_MAX_LEN, ge=1, le=HA_STATE_MAX_LEN)
    mode: Literal["text", "password"] = "text"


class NotifyConfig(CommandConfig):
    platform: ClassVar[Platform] = "notify"


class EventConfig(EntityConfig):
    platform: ClassVar[Platform] = "event"

    state_topic: str
    event_types: list[str] = Field(min_length=1)
    device_class: str | None = None


class HomeAssistantEvent(BaseModel):
    """Payload of ``{base}/{node}/event``: one message per final response, for the event entity.

    Home Assistant takes ``event_type`` as the event and every other field as an attribute of it.
    A timed-out request is ``error`` with ``error_code`` ``timeout``; ``error_code`` is null exactly
    when ``event_type`` is ``done``.
    """

    model_config = ConfigDict(extra="forbid")

    event_type: HaEventType
    id: str
    text: str
    finish_reason: FinishReason
    error_code: ErrorCode | None = None
    ts: float

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")
