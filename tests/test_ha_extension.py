"""The Home Assistant extension alone, with a fake host: what it publishes and when, on an injected clock."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Callable

import pytest

from rkllm_mqtt.bridge.dispatcher import Deadline
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.ha import discovery as ha
from rkllm_mqtt.ha.extension import (
    BIRTH_SPREAD_S,
    STALE_CONFIG_WAIT_S,
    HomeAssistantDiscovery,
    HomeAssistantRemoval,
    home_assistant_extension,
)
from rkllm_mqtt.payloads import FinalResponse, ModelInfo
from rkllm_mqtt.settings import Settings

NODE = "kitchen"
PREFIX = "homeassistant"


class FakeHost:
    """Records publishes; deadlines run when the test moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.published: list[tuple[str, bytes, bool]] = []
        self.deadlines: list[Deadline] = []
        self.model: ModelInfo | None = None
        self.status_republished = 0
        self._seq = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.published.append((topic, payload, retain))

    def call_later(self, delay_s: float, action: Callable[[], None]) -> Deadline:
        self._seq += 1
        deadline = Deadline(self.now + delay_s, self._seq, action)
        self.deadlines.append(deadline)
        return deadline

    def model_info(self) -> ModelInfo | None:
        return self.model

    def republish_status(self) -> None:
        self.status_republished += 1

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = sorted(d for d in self.deadlines if not d.cancelled and d.when <= self.now)
            if not due:
                return
            for deadline in due:
                self.deadlines.remove(deadline)
                deadline.action()

    def configs(self) -> dict[str, bytes]:
        return {t: p for t, p, _ in self.published if t.endswith("/config")}


def settings(**homeassistant: object) -> Settings:
    return Settings(mqtt={"node_id": NODE}, homeassistant={"enabled": True, **homeassistant})


def model(name: str) -> ModelInfo:
    return ModelInfo(
        model_path=f"/models/{name}.rkllm",
        model_name=name,
        abi="1.3",
        library="sim",
        max_context_len=4096,
        max_new_tokens=512,
        top_k=1,
        top_p=0.9,
        temperature=0.8,
        repeat_penalty=1.1,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        load_time_ms=10.0,
        loaded_at=0.0,
    )


def message(topic: str, payload: bytes, *, retain: bool = False) -> IncomingMessage:
    return IncomingMessage(topic=topic, payload=payload, retain=retain)


def started(ext: HomeAssistantDiscovery | HomeAssistantRemoval) -> FakeHost:
    host = FakeHost()
    ext.start(host)
    return host


ENTITIES = len(ha.entity_configs(settings(), None))


def test_the_factory_makes_discovery_only_when_enabled() -> None:
    assert isinstance(home_assistant_extension(settings()), HomeAssistantDiscovery)
    assert isinstance(home_assistant_extension(settings(enabled=False)), HomeAssistantRemoval)


def test_subscriptions_are_the_birth_topic_and_this_nodes_configs() -> None:
    ext = HomeAssistantDiscovery(settings(status_topic="site/ha/status"))
    assert ext.subscriptions() == ["site/ha/status", f"{PREFIX}/+/{NODE}/+/config"]
    assert HomeAssistantRemoval(settings(enabled=False)).subscriptions() == [f"{PREFIX}/+/{NODE}/+/config"]


def test_connect_announces_every_entity_then_clears_stale_configs_after_the_wait() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    ext.on_connected()
    announced = host.configs()
    assert len(announced) == ENTITIES and all(announced.values())
    assert all(retain for _, _, retain in host.published)
    stale = f"{PREFIX}/sensor/{NODE}/old_entity/config"
    offered = next(iter(announced))
    foreign = f"{PREFIX}/sensor/other/old_entity/config"
    assert ext.on_message(message(stale, b"{}", retain=True))
    assert ext.on_message(message(offered, b"{}", retain=True))
    assert not ext.on_message(message(foreign, b"{}", retain=True))  # not this node's: not the extension's
    host.published.clear()
    host.advance(STALE_CONFIG_WAIT_S - 0.1)
    assert host.published == []
    host.advance(0.1)
    assert host.published == [(stale, b"", True)]


def test_a_config_removed_before_the_sweep_is_not_cleared_again() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    ext.on_connected()
    stale = f"{PREFIX}/sensor/{NODE}/old_entity/config"
    ext.on_message(message(stale, b"{}", retain=True))
    ext.on_message(message(stale, b"", retain=True))
    host.published.clear()
    host.advance(STALE_CONFIG_WAIT_S)
    assert host.published == []


def test_a_reconnect_moves_the_sweep_instead_of_adding_one() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    ext.on_connected()
    host.advance(1.0)
    ext.on_connected()
    assert len([d for d in host.deadlines if not d.cancelled]) == 1


def test_a_birth_re_announces_once_within_the_spread() -> None:
    ext = HomeAssistantDiscovery(settings(), rng=random.Random(7))
    host = started(ext)
    ext.on_connected()
    host.advance(STALE_CONFIG_WAIT_S)
    host.published.clear()
    assert ext.on_message(message(ha.ha_status_topic(ext.settings), b"online"))
    host.advance(BIRTH_SPREAD_S[0] - 0.01)
    assert host.published == []
    host.advance(BIRTH_SPREAD_S[1] - BIRTH_SPREAD_S[0] + 0.02)
    assert len(host.configs()) == ENTITIES
    assert host.status_republished == 1
    assert ext.on_message(message(ha.ha_status_topic(ext.settings), b"offline"))  # Home Assistant leaving: nothing
    host.advance(10.0)
    assert len(host.configs()) == ENTITIES


def test_a_storm_of_births_costs_one_re_announce_and_little_memory() -> None:
    ext = HomeAssistantDiscovery(settings(), rng=random.Random(1))
    host = started(ext)
    ext.on_connected()
    host.advance(STALE_CONFIG_WAIT_S)
    host.published.clear()
    before = ext.announcements
    birth = message(ha.ha_status_topic(ext.settings), b"online")
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            ext.on_message(birth)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len([d for d in host.deadlines if not d.cancelled]) == 1  # one deadline for the whole burst
    assert grown < 64 * 1024
    host.advance(BIRTH_SPREAD_S[1])
    assert ext.announcements == before + 1
    assert len(host.configs()) == ENTITIES  # one config per entity, not one per birth
    # A birth after the burst is a new burst: announced again.
    ext.on_message(birth)
    host.advance(BIRTH_SPREAD_S[1])
    assert ext.announcements == before + 2


def test_a_new_model_is_announced_and_the_same_one_is_not() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    host.model = model("qwen")
    ext.on_connected()
    assert ext.announced_model == "qwen"
    host.published.clear()
    ext.on_runtime_change()
    assert host.published == []
    host.model = model("llama")
    ext.on_runtime_change()
    configs = host.configs()
    assert len(configs) == ENTITIES
    device = json.loads(next(iter(configs.values())))["device"]
    assert device["model"] == "llama"


def test_each_final_becomes_one_event_entity_message() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    final = FinalResponse(id="r1", state="done", text="hi", finish_reason="stop", node=NODE)
    ext.on_final(final)
    assert len(host.published) == 1
    topic, payload, retain = host.published[0]
    assert topic == f"rkllm/{NODE}/event" and not retain
    assert json.loads(payload)["event_type"] == "done"


def test_stop_cancels_what_is_due() -> None:
    ext = HomeAssistantDiscovery(settings())
    host = started(ext)
    ext.on_connected()
    ext.on_message(message(ha.ha_status_topic(ext.settings), b"online"))
    ext.stop()
    host.published.clear()
    host.advance(60.0)
    assert host.published == []


def test_disabled_discovery_removes_every_offered_config_and_what_is_left() -> None:
    ext = HomeAssistantRemoval(settings(enabled=False))
    host = started(ext)
    ext.on_connected()
    removals = host.configs()
    assert set(removals) == ha.offered_config_topics(settings())
    assert all(payload == b"" for payload in removals.values())
    leftover = f"{PREFIX}/sensor/{NODE}/old_entity/config"
    assert ext.on_message(message(leftover, b"{}", retain=True))
    assert not ext.on_message(message("homeassistant/status", b"online"))  # births mean nothing here
    host.published.clear()
    host.advance(STALE_CONFIG_WAIT_S)
    assert host.published == [(leftover, b"", True)]
    final = FinalResponse(id="r1", state="done", text="hi", finish_reason="stop", node=NODE)
    ext.on_final(final)
    ext.on_runtime_change()
    assert host.published == [(leftover, b"", True)]


@pytest.mark.parametrize("payload", [b"online", b" online\n"])
def test_birth_payloads(payload: bytes) -> None:
    assert ha.is_ha_online(payload)
