"""When the daemon acknowledges a prompt: once settled, except on the broker that lives and dies with it."""

from __future__ import annotations

from pathlib import Path

from rkllm_mqtt.daemon import prompts_acknowledged_when_settled
from rkllm_mqtt.settings import load_settings


def test_prompts_are_acknowledged_when_settled_on_a_broker_of_its_own(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhost = "broker.lan"\n')
    settings = load_settings(config, environ={})
    assert prompts_acknowledged_when_settled(settings)


def test_on_the_embedded_broker_prompts_are_acknowledged_on_receipt(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    settings = load_settings(config, environ={})
    assert settings.embedded_broker
    assert not prompts_acknowledged_when_settled(settings)
