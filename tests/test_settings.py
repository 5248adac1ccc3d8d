from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_mqtt.errors import ConfigError
from rkllm_mqtt.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkllm_mqtt", *args], check=False, capture_output=True, text=True, timeout=60, env=env
    )


def test_misspelled_key_is_named_with_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhots = "broker.lan"\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode != 0
    assert "mqtt.hots" in result.stderr
    assert str(config) in result.stderr
    assert "did you mean 'host'" in result.stderr


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[mqqt]\nhost = 'x'\n")
    with pytest.raises(ConfigError, match="mqqt"):
        load_settings(config)


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nqueue_size = 'many'\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config)
    assert "limits.queue_size" in str(excinfo.value)
    assert str(config) in str(excinfo.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[mqtt\nhost=")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode != 0
    assert "not valid TOML" in result.stderr


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhost = "file-host"\nport = 1884\n')
    monkeypatch.setenv("RKLLM_MQTT_MQTT__HOST", "env-host")
    settings = load_settings(config)
    assert settings.mqtt.host == "env-host"
    assert settings.mqtt.port == 1884


def test_misspelled_environment_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MQTT_LIMITS__QUEUE_SIZ", "3")
    with pytest.raises(ConfigError, match="RKLLM_MQTT_LIMITS__QUEUE_SIZ"):
        load_settings(None)


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhost = "broker"\nusername = "ha"\npassword = "hunter2"\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "**********" in result.stdout
    assert '"username": "ha"' in result.stdout


def test_password_file_drops_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[mqtt]\nhost = "broker"\npassword_file = "{secret}"\n')
    password = load_settings(config).mqtt.resolved_password()
    assert password is not None
    assert password.get_secret_value() == "s3cret"


def test_zero_config_defaults() -> None:
    settings = load_settings(None)
    assert settings.embedded_broker
    assert settings.runtime.resolved_library() == "sim"
    assert settings.reply_prefixes() == ["rkllm/reply"]
    assert settings.limits.queue_size == 8


def test_model_path_switches_default_library(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[runtime]\nmodel_path = "/models/qwen.rkllm"\n')
    assert load_settings(config).runtime.resolved_library() == "librkllmrt.so"


def test_example_config_is_valid_and_complete() -> None:
    example = REPO / "config" / "config.example.toml"
    settings = load_settings(example)
    text = example.read_text()
    for section, model in settings:
        if section in ("source_file",):
            continue
        for key in type(model).model_fields:
            assert f"{key} " in text or f"{key}=" in text, f"{section}.{key} is not documented in the example"


def test_invalid_node_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MQTT_MQTT__NODE_ID", "kitchen/board")
    with pytest.raises(ConfigError, match=r"mqtt\.node_id"):
        load_settings(None)


def test_configuration_doc_describes_every_key() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    settings = load_settings(None)
    for section, model in settings:
        assert f"## `[{section}]`" in doc, section
        for key in type(model).model_fields:
            assert f"`{key}`" in doc, f"{section}.{key} is missing from docs/configuration.md"


def test_topic_reference_lists_every_error_code_and_topic() -> None:
    from rkllm_mqtt.errors import ERROR_CODES
    from rkllm_mqtt.topics import Topics

    doc = (REPO / "docs" / "topics.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in doc, f"error code {code} is not documented"
    topics = Topics("{b}", "{n}")
    for topic in (*topics.fixed(), topics.group_prompt):
        assert topic in doc, f"{topic} is not documented"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RKLLM_MQTT_")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("RKLLM_MQTT_LIMIT__QUEUE_SIZE", "RKLLM_MQTT_LIMITS__QUEUE_SIZE"),  # misspelt section
        ("RKLLM_MQTT_MQTT_HOST", "RKLLM_MQTT_MQTT__HOST"),  # one underscore
        ("RKLLM_MQTT_RUNTIME__MODELPATH", "RKLLM_MQTT_RUNTIME__MODEL_PATH"),
    ],
)
def test_every_unknown_environment_variable_is_refused_with_the_closest_name(variable: str, closest: str) -> None:
    result = run_cli("check-config", env=clean_env(**{variable: "3"}))
    assert result.returncode == 2, result.stdout
    assert variable in result.stderr
    assert f"did you mean {closest}?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_list_that_is_not_json_names_the_variable_and_the_form() -> None:
    result = run_cli("check-config", env=clean_env(RKLLM_MQTT_LIMITS__RESPONSE_TOPIC_PREFIXES="rkllm/reply"))
    assert result.returncode == 2
    assert "RKLLM_MQTT_LIMITS__RESPONSE_TOPIC_PREFIXES" in result.stderr
    assert "JSON array" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_json_value_of_the_wrong_shape_names_the_variable_and_the_form() -> None:
    result = run_cli("check-config", env=clean_env(RKLLM_MQTT_LIMITS__RESPONSE_TOPIC_PREFIXES='"rkllm/reply"'))
    assert result.returncode == 2
    assert "RKLLM_MQTT_LIMITS__RESPONSE_TOPIC_PREFIXES (limits.response_topic_prefixes)" in result.stderr
    assert "JSON array" in result.stderr


def test_a_scalar_that_cannot_be_parsed_names_the_variable() -> None:
    result = run_cli("check-config", env=clean_env(RKLLM_MQTT_LIMITS__QUEUE_SIZE="many"))
    assert result.returncode == 2
    assert "RKLLM_MQTT_LIMITS__QUEUE_SIZE (limits.queue_size)" in result.stderr
    assert "integer" in result.stderr


def test_lists_and_scalars_from_the_environment_are_applied() -> None:
    settings = load_settings(
        None,
        environ={
            "RKLLM_MQTT_LIMITS__RESPONSE_TOPIC_PREFIXES": '["a/reply", "{base_topic}/x"]',
            "RKLLM_MQTT_LIMITS__QUEUE_SIZE": "3",
            "RKLLM_MQTT_MQTT__TLS": "true",
        },
    )
    assert settings.reply_prefixes() == ["a/reply", "rkllm/x"]
    assert settings.limits.queue_size == 3
    assert settings.mqtt.tls is True


def test_check_config_stdout_is_pure_json(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhost = "broker"\n')
    result = run_cli("check-config", "--config", str(config), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mqtt"]["host"] == "broker"
    assert f"# configuration from {config}" in result.stderr


@pytest.mark.parametrize("command", [["serve"], ["ask", "hi"], ["doctor"], ["check-config"]])
@pytest.mark.parametrize("unreadable", ["missing", "directory"])
def test_an_unreadable_password_file_stops_every_command_with_exit_2(
    tmp_path: Path, command: list[str], unreadable: str
) -> None:
    secret = tmp_path / "password"
    if unreadable == "directory":
        secret.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = 1\npassword_file = "{secret}"\n')
    result = run_cli(command[0], "--config", str(config), *command[1:], env=clean_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"mqtt.password_file: cannot read {secret}" in result.stderr
    reason = "No such file or directory" if unreadable == "missing" else "Is a directory"
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["31415926535", "[31415, 926535]", '{ pin = "31415926535" }', "3.1415926535", "true"])
def test_validation_errors_never_echo_a_password(tmp_path: Path, value: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[mqtt]\nhost = "broker"\npassword = {value}\n')
    result = run_cli("check-config", "--config", str(config), env=clean_env())
    assert result.returncode == 2
    assert "mqtt.password" in result.stderr and "value not shown" in result.stderr
    for fragment in ("31415", "926535", "true"):
        assert fragment not in result.stderr


def test_discovery_is_off_on_the_embedded_broker_unless_set() -> None:
    embedded = load_settings(None, environ={})
    assert embedded.homeassistant.enabled is False
    assert embedded.discovery_defaulted_off
    forced = load_settings(None, environ={"RKLLM_MQTT_HOMEASSISTANT__ENABLED": "true"})
    assert forced.homeassistant.enabled is True and not forced.discovery_defaulted_off
    external = load_settings(None, environ={"RKLLM_MQTT_MQTT__HOST": "broker.lan"})
    assert external.homeassistant.enabled is True and not external.discovery_defaulted_off


def test_discovery_set_in_the_file_wins_on_the_embedded_broker(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[homeassistant]\nenabled = true\n")
    assert load_settings(config, environ={}).homeassistant.enabled is True


def test_the_exit_code_table_in_the_docs_matches_the_code() -> None:
    from rkllm_mqtt import exit_codes

    doc = (REPO / "docs" / "cli.md").read_text()
    assert len(set(exit_codes.MEANINGS)) == len(exit_codes.MEANINGS)
    for code, meaning in exit_codes.MEANINGS.items():
        assert f"| {code} | {meaning} |" in doc, f"exit code {code} is not in docs/cli.md as in exit_codes.py"
    assert "docs/cli.md" in (REPO / "README.md").read_text()


def test_every_secret_setting_is_hidden_in_validation_errors(tmp_path: Path) -> None:
    # Found from the model (SecretStr), so a secret added later is covered too; api.token is one.
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhost = "broker"\n[api]\ntoken = [27182818, 28459045]\n')
    result = run_cli("check-config", "--config", str(config), env=clean_env())
    assert result.returncode == 2
    assert "api.token" in result.stderr and "value not shown" in result.stderr
    assert "27182818" not in result.stderr and "28459045" not in result.stderr


@pytest.mark.parametrize("base", ["rk\x01llm", "rk\u0085llm", "rk\ufdd0llm", "rkllm\x00"])
def test_a_base_topic_the_broker_would_refuse_is_a_config_error(tmp_path: Path, base: str) -> None:
    # Every topic of the bridge starts with the base topic: one refused character would silence the bridge.
    config = tmp_path / "config.toml"
    config.write_text(f"[mqtt]\nbase_topic = {json.dumps(base)}\n")
    with pytest.raises(ConfigError, match="base_topic"):
        load_settings(config)


def test_a_sim_spec_as_model_picks_the_simulated_runtime(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[runtime]\nmodel_path = "sim:tokens=8"\n')
    assert load_settings(config).runtime.resolved_library() == "sim"
    config.write_text('[runtime]\nmodel_path = "/opt/models/qwen.rkllm"\n')
    assert load_settings(config).runtime.resolved_library() == "librkllmrt.so"
