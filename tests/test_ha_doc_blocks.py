"""The YAML examples of docs/home-assistant.md as the Home Assistant live run (bench/ha_live) reads them.

The live run itself needs a Home Assistant install and minutes; these checks are cheap and keep the page and the
run from drifting apart: every block is one the run knows how to execute, and the ask script still relies on the
bridge's retained finals the way the page explains.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ha_live.doc_blocks import DOC, Kind, UnknownBlockError, blocks, only
from bench.ha_live.run import card_entities, hass_config, markdown_contents, recorded


def test_every_yaml_block_of_the_page_is_one_the_live_run_executes() -> None:
    found = blocks()
    kinds = [block.kind for block in found]
    for kind in (Kind.ASK_SCRIPT, Kind.ASK_USE, Kind.AUTOMATION, Kind.ACTION, Kind.CARD):
        assert kinds.count(kind) == 1, kind
    assert Kind.CONFIGURATION in kinds


def test_an_unknown_block_stops_the_run(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Intro\n\n```yaml\nsomething_new:\n  a: 1\n```\n")
    with pytest.raises(UnknownBlockError, match="line 3"):
        blocks(page)


def test_indented_blocks_are_read_too(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("- item:\n\n  ```yaml\n  recorder:\n    purge_keep_days: 3\n  ```\n")
    (block,) = blocks(page)
    assert block.kind is Kind.CONFIGURATION
    assert block.data == {"recorder": {"purge_keep_days": 3}}


def test_the_ask_script_waits_on_the_request_topic_and_returns_the_final() -> None:
    script = only(blocks(), Kind.ASK_SCRIPT).data["ask_llm"]
    steps = script["sequence"]
    publish = next(step for step in steps if step.get("action") == "mqtt.publish")
    wait = next(step for step in steps if "wait_for_trigger" in step)
    assert publish["data"]["topic"] == "rkllm/orangepi5/prompt"
    assert wait["wait_for_trigger"][0]["topic"] == "rkllm/orangepi5/response/{{ request_id }}"
    assert steps.index(publish) < steps.index(wait)
    assert steps[-1]["response_variable"] == "result"


def test_devices_the_run_lacks_are_swapped_for_recorded_actions() -> None:
    automation = only(blocks(), Kind.AUTOMATION).data
    swapped = recorded(automation)
    speak = swapped["actions"][0]["sequence"]
    assert speak[0]["variables"]["recorded"]["target"] == automation["actions"][0]["target"]
    assert speak[1] == {
        "action": "mqtt.publish",
        "data": {"topic": "harness/recorded/tts.speak", "payload": "{{ recorded | to_json }}"},
    }
    # The real parts stay as the page has them.
    assert swapped["triggers"] == automation["triggers"]
    use = recorded(only(blocks(), Kind.ASK_USE).data)
    assert use[0]["action"] == "script.ask_llm"


def test_the_card_s_entities_and_template_are_found() -> None:
    card = only(blocks(), Kind.CARD).data
    entities = card_entities(card)
    assert "sensor.rkllm_orangepi5_status" in entities
    assert len(entities) == len(set(entities)) >= 5
    assert markdown_contents(card) == ["{{ state_attr('sensor.rkllm_orangepi5_last_response', 'text') }}"]


def test_home_assistant_configuration_holds_the_page_s_blocks(tmp_path: Path) -> None:
    config = hass_config(blocks(), mqtt_port=1883, protocol="3.1.1")
    config.write(tmp_path)
    assert "recorder" in config.configuration
    assert (tmp_path / "configuration.yaml").read_text().startswith("script: !include scripts.yaml\n")
    assert "ask_llm" in (tmp_path / "scripts.yaml").read_text()
    assert DOC.name == "home-assistant.md"
