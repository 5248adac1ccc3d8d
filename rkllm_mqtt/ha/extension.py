"""Home Assistant discovery as an extension of the MQTT door.

:class:`HomeAssistantDiscovery` (``homeassistant.enabled = true``) owns the whole lifecycle: it publishes one
retained config per entity on every connect, clears this node's retained configs that are no longer offered
(after ``STALE_CONFIG_WAIT_S``, once the broker has sent what it retains), announces again when the loaded model
changes, publishes the event entity's message for each final response, and re-announces when Home Assistant
publishes its birth message. Births are debounced: the first one of a burst sets one deadline 1-5 s ahead (spread
so that many devices do not answer at the same instant) and every birth until then is absorbed by it, so any
number of births costs one re-announce and no thread.

:class:`HomeAssistantRemoval` (discovery disabled) only removes what an earlier run left: the device disappears
from Home Assistant.
"""

from __future__ import annotations

import random

import structlog

from rkllm_mqtt.bridge.dispatcher import Deadline
from rkllm_mqtt.bridge.extension import Extension, ExtensionHost
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.payloads import FinalResponse
from rkllm_mqtt.settings import Settings

from . import discovery as ha

log = structlog.get_logger(__name__)

# After a connect, how long the broker gets to send the retained configs it holds before stale ones are cleared.
STALE_CONFIG_WAIT_S = 3.0
# A re-announce after a birth comes this many seconds later (uniformly spread).
BIRTH_SPREAD_S = (1.0, 5.0)


class _RetainedConfigs:
    """This node's retained discovery configs, as the broker reports them; stale ones are cleared."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host: ExtensionHost | None = None
        self.seen: set[str] = set()
        self._sweep: Deadline | None = None

    def subscriptions(self) -> list[str]:
        return ha.discovery_subscriptions(self.settings)

    def start(self, host: ExtensionHost) -> None:
        self.host = host

    def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def schedule_sweep(self) -> None:
        assert self.host is not None
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep = self.host.call_later(STALE_CONFIG_WAIT_S, self.sweep)

    def sweep(self) -> None:
        self._sweep = None
        removals = ha.stale_config_removals(self.settings, set(self.seen))
        self.publish(removals)
        if removals:
            log.info("discovery_stale_removed", topics=[m.topic for m in removals])

    def observe(self, message: IncomingMessage) -> bool:
        if not ha.is_own_config_topic(self.settings, message.topic):
            return False
        if message.payload:
            self.seen.add(message.topic)
        else:
            self.seen.discard(message.topic)
        return True

    def publish(self, messages: list[ha.DiscoveryMessage]) -> None:
        assert self.host is not None
        for message in messages:
            self.host.publish(message.topic, message.payload, retain=message.retain)


class HomeAssistantDiscovery:
    """The Home Assistant extension (discovery enabled)."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.status_topic = ha.ha_status_topic(settings)
        self.event_topic = ha.ha_event_topic(settings)
        self.configs = _RetainedConfigs(settings)
        self.host: ExtensionHost | None = None
        self.announced_model: str | None = None
        self.announcements = 0
        self._reannounce: Deadline | None = None

    def subscriptions(self) -> list[str]:
        return [self.status_topic, *self.configs.subscriptions()]

    def start(self, host: ExtensionHost) -> None:
        self.host = host
        self.configs.start(host)

    def stop(self) -> None:
        self.configs.stop()
        if self._reannounce is not None:
            self._reannounce.cancel()
            self._reannounce = None

    def on_connected(self) -> None:
        self.announce()
        self.configs.schedule_sweep()

    def on_message(self, message: IncomingMessage) -> bool:
        if message.topic == self.status_topic:
            if ha.is_ha_online(message.payload):
                self._birth()
            return True
        return self.configs.observe(message)

    def on_runtime_change(self) -> None:
        assert self.host is not None
        info = self.host.model_info()
        if info is not None and info.model_name != self.announced_model:
            self.announce()

    def on_final(self, final: FinalResponse) -> None:
        assert self.host is not None
        self.host.publish(self.event_topic, ha.ha_event_payload(final).to_json(), retain=False)

    def _birth(self) -> None:
        if self._reannounce is not None:
            return  # a re-announce is already due: this birth is part of the same burst
        assert self.host is not None
        self._reannounce = self.host.call_later(self.rng.uniform(*BIRTH_SPREAD_S), self._after_birth)

    def _after_birth(self) -> None:
        self._reannounce = None
        assert self.host is not None
        self.host.republish_status()
        self.announce()

    def announce(self) -> None:
        assert self.host is not None
        info = self.host.model_info()
        messages = ha.discovery_messages(self.settings, info)
        self.configs.publish(messages)
        self.announced_model = info.model_name if info else None
        self.announcements += 1
        log.info("discovery_published", entities=len(messages), model=self.announced_model)


class HomeAssistantRemoval:
    """Discovery disabled: remove this node's entities (every config it offers, and any it left retained)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.configs = _RetainedConfigs(settings)

    def subscriptions(self) -> list[str]:
        return self.configs.subscriptions()

    def start(self, host: ExtensionHost) -> None:
        self.configs.start(host)

    def stop(self) -> None:
        self.configs.stop()

    def on_connected(self) -> None:
        removals = ha.removal_messages(self.settings)
        self.configs.publish(removals)
        log.info("discovery_removed", entities=len(removals), reason="homeassistant.enabled is false")
        self.configs.schedule_sweep()

    def on_message(self, message: IncomingMessage) -> bool:
        return self.configs.observe(message)

    def on_runtime_change(self) -> None:
        pass

    def on_final(self, final: FinalResponse) -> None:
        pass


def home_assistant_extension(settings: Settings) -> Extension:
    """The extension for the settings: discovery when enabled, removal of what is left when not."""
    if settings.homeassistant.enabled:
        return HomeAssistantDiscovery(settings)
    return HomeAssistantRemoval(settings)
