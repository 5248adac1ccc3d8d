"""Home Assistant discovery: the configs the bridge publishes, their topics, and their removal."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from rkllm_mqtt import __version__
from rkllm_mqtt.ha import (
    DiscoveryMessage,
    discovery_messages,
    discovery_subscriptions,
    ha_event_payload,
    ha_event_topic,
    ha_status_topic,
    is_ha_online,
    is_own_config_topic,
    offered_config_topics,
    removal_messages,
    stale_config_removals,
)
from rkllm_mqtt.ha.models import ENTITY_ID_PATTERN
from rkllm_mqtt.payloads import (
    ErrorInfo,
    FinalResponse,
    HealthPayload,
    ModelInfo,
    StatePayload,
    Timing,
    Usage,
)
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import Topics

PREFIX = "ha-disc"
BASE = "llm"
NODE = "Board-1"

EXPECTED_ENTITIES = {
    ("text", "prompt"),
    ("notify", "ask"),
    ("sensor", "status"),
    ("sensor", "last_response"),
    ("sensor", "tokens_per_second"),
    ("sensor", "time_to_first_token"),
    ("sensor", "queue_depth"),
    ("sensor", "requests_total"),
    ("sensor", "errors_total"),
    ("sensor", "model"),
    ("sensor", "last_error"),
    ("binary_sensor", "busy"),
    ("binary_sensor", "problem"),
    ("button", "abort"),
    ("button", "clear_history"),
    ("event", "response"),
}


def make_settings(**homeassistant: Any) -> Settings:
    return Settings(
        mqtt={"host": "broker.lan", "base_topic": BASE, "node_id": NODE},
        homeassistant={"discovery_prefix": PREFIX, **homeassistant},
    )


def make_model(name: str = "qwen2.5-1.5b-instruct", runtime_version: str | None = "1.2.1") -> ModelInfo:
    return ModelInfo(
        model_path=f"/models/{name}.rkllm",
        model_name=name,
        abi="1.2",
        runtime_version=runtime_version,
        library="librkllmrt.so",
        max_context_len=4096,
        max_new_tokens=512,
        top_k=1,
        top_p=0.9,
        temperature=0.8,
        repeat_penalty=1.1,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        load_time_ms=1234.0,
        loaded_at=1_700_000_000.0,
    )


def configs(settings: Settings, model: ModelInfo | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """The published configs keyed by (platform, object id), read back from the topics and JSON."""
    result: dict[tuple[str, str], dict[str, Any]] = {}
    for message in discovery_messages(settings, model):
        prefix, platform, node, object_id, last = message.topic.split("/")
        assert (prefix, node, last) == (PREFIX, NODE, "config")
        assert message.retain is True
        result[(platform, object_id)] = json.loads(message.payload.decode("utf-8"))
    return result


def daemon_topics(settings: Settings) -> set[str]:
    return set(Topics(settings.mqtt.base_topic, settings.mqtt.node_id).fixed())


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def test_one_retained_config_per_expected_entity_at_the_documented_topics() -> None:
    settings = make_settings()
    messages = discovery_messages(settings, make_model())
    assert len(messages) == len(EXPECTED_ENTITIES)
    assert {m.topic for m in messages} == {
        f"{PREFIX}/{platform}/{NODE}/{object_id}/config" for platform, object_id in EXPECTED_ENTITIES
    }
    assert set(configs(settings)) == EXPECTED_ENTITIES
    assert offered_config_topics(settings) == {m.topic for m in messages}


def test_every_config_carries_identity_device_origin_and_availability() -> None:
    settings = make_settings()
    topics = Topics(BASE, NODE)
    for (platform, object_id), config in configs(settings, make_model()).items():
        assert config["unique_id"] == f"rkllm_mqtt_{NODE}_{object_id}"
        entity_id = config["default_entity_id"]
        assert re.match(ENTITY_ID_PATTERN, entity_id), entity_id
        assert entity_id == f"{platform}.rkllm_board_1_{object_id}"
        assert "object_id" not in config
        device = config["device"]
        assert device["identifiers"] == [f"rkllm_mqtt_{NODE}"]
        assert device["name"] == f"RKLLM {NODE}"
        assert device["sw_version"] == __version__
        assert device["manufacturer"]
        origin = config["origin"]
        assert origin["name"] == "rkllm-mqtt"
        assert origin["sw_version"] == __version__
        assert origin.get("support_url", "https://").startswith(("https://", "http://"))
        assert config["availability"] == [
            {"topic": topics.availability, "payload_available": "online", "payload_not_available": "offline"}
        ]
        assert config["name"]
        # No key is sent as null: unset options are left to Home Assistant's defaults.
        assert None not in config.values()


def test_ids_are_distinct_and_entity_ids_match_what_older_releases_derive_from_names() -> None:
    settings = make_settings()
    all_configs = configs(settings)
    unique_ids = [c["unique_id"] for c in all_configs.values()]
    entity_ids = [c["default_entity_id"] for c in all_configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    assert len(set(entity_ids)) == len(entity_ids)
    # Releases before default_entity_id build the entity id from "<device name> <entity name>":
    # with the default device name both ways give the same id.
    for (platform, _), config in all_configs.items():
        derived = f"{platform}.{slugify(config['device']['name'] + ' ' + config['name'])}"
        assert derived == config["default_entity_id"]


def test_entity_ids_are_valid_for_any_topic_safe_node_id() -> None:
    for node in ("MyBoard", "orange-pi-5", "a__b", "-x-", "rk3588_01"):
        settings = Settings(mqtt={"node_id": node})
        for message in discovery_messages(settings, None):
            entity_id = json.loads(message.payload)["default_entity_id"]
            assert re.match(ENTITY_ID_PATTERN, entity_id), (node, entity_id)


def test_every_referenced_topic_is_one_the_daemon_uses() -> None:
    settings = make_settings()
    allowed = daemon_topics(settings)
    seen: set[str] = set()
    for config in configs(settings).values():
        for key, value in config.items():
            if key.endswith("_topic"):
                assert value in allowed, (key, value)
                seen.add(value)
        for availability in config["availability"]:
            assert availability["topic"] in allowed
    topics = Topics(BASE, NODE)
    assert {topics.prompt, topics.abort, topics.clear, topics.state, topics.health, topics.model} <= seen
    assert {topics.last, ha_event_topic(settings)} <= seen
    assert ha_event_topic(settings) == f"{BASE}/{NODE}/event"


def test_prompt_entities_publish_to_the_prompt_topic() -> None:
    all_configs = configs(make_settings())
    text = all_configs[("text", "prompt")]
    assert text["command_topic"] == f"{BASE}/{NODE}/prompt"
    assert text["max"] == 255
    assert text["min"] >= 1
    assert text["mode"] == "text"
    assert text["retain"] is False
    notify = all_configs[("notify", "ask")]
    assert notify["command_topic"] == f"{BASE}/{NODE}/prompt"
    assert "max" not in notify
    assert notify["retain"] is False


def test_buttons_send_an_empty_payload_to_abort_and_clear() -> None:
    all_configs = configs(make_settings())
    abort = all_configs[("button", "abort")]
    clear = all_configs[("button", "clear_history")]
    assert abort["command_topic"] == f"{BASE}/{NODE}/abort"
    assert clear["command_topic"] == f"{BASE}/{NODE}/clear"
    # Explicitly present: leaving it out would make Home Assistant send its default "PRESS",
    # which the bridge would take for a request id / session id.
    assert abort["payload_press"] == ""
    assert clear["payload_press"] == ""
    assert abort["retain"] is False and clear["retain"] is False


def test_sensor_classes_units_and_categories() -> None:
    all_configs = configs(make_settings())
    for counter in ("requests_total", "errors_total"):
        config = all_configs[("sensor", counter)]
        assert config["state_class"] == "total_increasing"
        assert config["state_topic"] == f"{BASE}/{NODE}/state"
    tps = all_configs[("sensor", "tokens_per_second")]
    assert (tps["state_class"], tps["unit_of_measurement"]) == ("measurement", "tok/s")
    assert "device_class" not in tps  # a custom unit is allowed only without a device class
    ttft = all_configs[("sensor", "time_to_first_token")]
    assert (ttft["device_class"], ttft["state_class"], ttft["unit_of_measurement"]) == (
        "duration",
        "measurement",
        "ms",
    )
    assert all_configs[("sensor", "queue_depth")]["state_class"] == "measurement"
    status = all_configs[("sensor", "status")]
    assert status["device_class"] == "enum"
    assert set(status["options"]) == {"idle", "busy", "loading", "error"}
    for diagnostic in (("sensor", "model"), ("sensor", "last_error"), ("binary_sensor", "problem")):
        assert all_configs[diagnostic]["entity_category"] == "diagnostic"
    assert all_configs[("sensor", "model")]["json_attributes_topic"] == f"{BASE}/{NODE}/model"
    assert all_configs[("sensor", "last_error")]["state_topic"] == f"{BASE}/{NODE}/health"
    assert all_configs[("binary_sensor", "busy")]["device_class"] == "running"
    assert all_configs[("binary_sensor", "problem")]["device_class"] == "problem"
    assert all_configs[("binary_sensor", "problem")]["state_topic"] == f"{BASE}/{NODE}/health"
    for config in all_configs.values():
        assert config.get("icon", "mdi:x").startswith("mdi:")


def test_event_entity_listens_to_the_event_topic_with_three_types() -> None:
    event = configs(make_settings())[("event", "response")]
    assert event["state_topic"] == f"{BASE}/{NODE}/event"
    assert event["event_types"] == ["done", "error", "aborted"]


def test_no_entity_listens_to_token_chunks_or_responses() -> None:
    for config in configs(make_settings()).values():
        for key, value in config.items():
            if key.endswith("_topic"):
                assert "/response" not in value and not value.endswith("/stream")


def test_model_name_and_runtime_version_flow_into_the_device() -> None:
    settings = make_settings()
    loaded = configs(settings, make_model("llama-3.2-1b", runtime_version="1.3.0"))
    for config in loaded.values():
        assert config["device"]["model"] == "llama-3.2-1b"
        assert config["device"]["hw_version"] == "1.3.0"
    unknown = configs(settings, None)
    for config in unknown.values():
        assert config["device"]["model"] == "unknown"
        assert "hw_version" not in config["device"]
    no_version = configs(settings, make_model(runtime_version=None))
    assert all("hw_version" not in c["device"] for c in no_version.values())


def test_device_name_setting_names_the_device() -> None:
    for config in configs(make_settings(device_name="Kitchen LLM")).values():
        assert config["device"]["name"] == "Kitchen LLM"
        # The entity ids stay tied to the node, not to a name the user may change.
        assert "rkllm_board_1_" in config["default_entity_id"]


def test_stale_removals_touch_only_this_nodes_configs_that_are_not_offered() -> None:
    settings = make_settings()
    offered = offered_config_topics(settings)
    stale_sensor = f"{PREFIX}/sensor/{NODE}/old_metric/config"
    stale_switch = f"{PREFIX}/switch/{NODE}/gone/config"
    retained = [
        *offered,
        stale_sensor,
        stale_switch,
        f"{PREFIX}/sensor/other-node/old_metric/config",  # another node's
        f"{PREFIX}/sensor/{NODE}/old_metric/state",  # not a config topic
        f"{PREFIX}/sensor/{NODE}/a/b/config",  # deeper than a config topic
        f"homeassistant/sensor/{NODE}/old_metric/config",  # another discovery prefix
        f"{BASE}/{NODE}/state",  # our own state, seen on a broker that replays everything
    ]
    removals = stale_config_removals(settings, retained)
    assert [m.topic for m in removals] == sorted([stale_sensor, stale_switch])
    assert all(m.payload == b"" and m.retain for m in removals)
    assert stale_config_removals(settings, offered) == []
    assert stale_config_removals(settings, []) == []


def test_disabled_discovery_publishes_nothing_and_removes_everything() -> None:
    settings = make_settings(enabled=False)
    assert discovery_messages(settings, make_model()) == []
    removals = removal_messages(settings)
    assert {m.topic for m in removals} == offered_config_topics(make_settings())
    assert len(removals) == len(EXPECTED_ENTITIES)
    assert all(m == DiscoveryMessage(m.topic, b"", True) for m in removals)
    # Whatever this node left retained before is stale now, offered or not.
    leftover = [f"{PREFIX}/sensor/{NODE}/status/config", f"{PREFIX}/sensor/{NODE}/old/config"]
    assert [m.topic for m in stale_config_removals(settings, leftover)] == sorted(leftover)


def test_subscriptions_and_status_topic() -> None:
    settings = make_settings()
    assert discovery_subscriptions(settings) == [f"{PREFIX}/+/{NODE}/+/config"]
    assert ha_status_topic(settings) == "homeassistant/status"  # Home Assistant's default, whatever the prefix
    assert ha_status_topic(make_settings(status_topic="site/ha-status")) == "site/ha-status"
    assert is_ha_online(b"online") and not is_ha_online(b"offline")
    nested = Settings(mqtt={"node_id": NODE}, homeassistant={"discovery_prefix": "site/ha"})
    assert is_own_config_topic(nested, f"site/ha/sensor/{NODE}/x/config")
    assert not is_own_config_topic(nested, f"site/sensor/{NODE}/x/config")
    assert not is_own_config_topic(nested, f"site/ha/sensor/{NODE}//config")


def _final(**fields: Any) -> FinalResponse:
    base: dict[str, Any] = {
        "id": "req-1",
        "text": "The answer is 42.",
        "node": NODE,
        "model": "qwen",
        "usage": Usage(completion_tokens=5),
        "timing": Timing(total_ms=100.0),
        "ts": 1_700_000_123.5,
    }
    return FinalResponse(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "event_type", "error_code"),
    [
        ({"state": "done", "finish_reason": "stop"}, "done", None),
        ({"state": "done", "finish_reason": "length"}, "done", None),
        (
            {"state": "timeout", "finish_reason": "timeout", "error": ErrorInfo(code="timeout", message="t")},
            "error",
            "timeout",
        ),
        (
            {"state": "aborted", "finish_reason": "abort", "error": ErrorInfo(code="aborted", message="a")},
            "aborted",
            "aborted",
        ),
        (
            {"state": "error", "finish_reason": "error", "error": ErrorInfo(code="queue_full", message="q")},
            "error",
            "queue_full",
        ),
        ({"state": "timeout", "finish_reason": "timeout"}, "error", "timeout"),
    ],
)
def test_event_payload_from_final_response(fields: dict[str, Any], event_type: str, error_code: str | None) -> None:
    final = _final(**fields)
    event = ha_event_payload(final)
    payload = json.loads(event.to_json())
    assert payload == {
        "event_type": event_type,
        "id": "req-1",
        "text": "The answer is 42.",
        "finish_reason": final.finish_reason,
        "error_code": error_code,
        "ts": 1_700_000_123.5,
    }
    assert payload["event_type"] in configs(make_settings())[("event", "response")]["event_types"]


# --- the templates, rendered the way Home Assistant renders them --------------------------------


def _render(template: str, payload: bytes) -> str:
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment()
    return str(env.from_string(template).render(value_json=json.loads(payload)))


def test_last_response_state_is_cut_to_255_and_attributes_hold_the_full_text() -> None:
    config = configs(make_settings())[("sensor", "last_response")]
    long_text = "é" * 300
    payload = _final(state="done", finish_reason="stop", text=long_text, session="kitchen").to_json()
    state = _render(config["value_template"], payload)
    assert state == long_text[:255]
    attributes = json.loads(_render(config["json_attributes_template"], payload))
    assert attributes["text"] == long_text
    assert attributes["final_state"] == "done"
    assert attributes["session"] == "kitchen"
    assert attributes["usage"]["completion_tokens"] == 5
    assert {"id", "finish_reason", "timing", "error"} <= set(attributes)
    # "state" is a name Home Assistant drops from MQTT attributes.
    assert "state" not in attributes


def test_state_driven_templates_render_from_the_daemon_payloads() -> None:
    all_configs = configs(make_settings())
    busy = StatePayload(
        status="busy", request_id="r1", queue_depth=2, requests_total=7, errors_total=1, tokens_per_s=12.5
    ).to_json()
    idle = StatePayload(status="idle").to_json()
    assert _render(all_configs[("sensor", "status")]["value_template"], busy) == "busy"
    assert _render(all_configs[("binary_sensor", "busy")]["value_template"], busy) == "ON"
    assert _render(all_configs[("binary_sensor", "busy")]["value_template"], idle) == "OFF"
    assert _render(all_configs[("sensor", "queue_depth")]["value_template"], busy) == "2"
    assert _render(all_configs[("sensor", "requests_total")]["value_template"], busy) == "7"
    assert _render(all_configs[("sensor", "tokens_per_second")]["value_template"], busy) == "12.5"
    # Home Assistant turns the rendered "None" of a numeric sensor into "unknown".
    assert _render(all_configs[("sensor", "time_to_first_token")]["value_template"], idle) == "None"
    ok = HealthPayload(status="ok", runtime="ready", started_at=1_700_000_000.0).to_json()
    failed = HealthPayload(
        status="error", runtime="failed", started_at=1_700_000_000.0, last_error="model not found: /x.rkllm"
    ).to_json()
    assert _render(all_configs[("binary_sensor", "problem")]["value_template"], ok) == "OFF"
    assert _render(all_configs[("binary_sensor", "problem")]["value_template"], failed) == "ON"
    assert _render(all_configs[("sensor", "last_error")]["value_template"], ok) == "none"
    assert _render(all_configs[("sensor", "last_error")]["value_template"], failed) == "model not found: /x.rkllm"
    model = make_model("phi-3").to_json()
    assert _render(all_configs[("sensor", "model")]["value_template"], model) == "phi-3"
