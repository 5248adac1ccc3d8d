"""Settings: a TOML file overridden by ``RKLLM_MQTT_<SECTION>__<KEY>`` environment variables.

Every section forbids unknown keys: a misspelled key in a config file must stop the daemon with
the key named, not be ignored while the user wonders why the setting has no effect.
"""

from __future__ import annotations

import difflib
import re
import socket
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rkllm_mqtt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 boards only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/rkllm-mqtt/config.toml")
ENV_PREFIX = "RKLLM_MQTT_"
SIM_LIBRARY = "sim"
VENDOR_LIBRARY = "librkllmrt.so"

_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def topic_safe(name: str) -> str:
    """A single MQTT topic level made of letters, digits, ``_`` and ``-`` only."""
    cleaned = _TOPIC_UNSAFE.sub("_", name).strip("_")
    return cleaned or "rkllm"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MqttSettings(_Section):
    host: str | None = Field(
        None, description="Broker host name or address. Unset: start the embedded broker on 127.0.0.1."
    )
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port (8883 is usual for TLS).")
    username: str | None = Field(None, description="User name for the broker login.")
    password: SecretStr | None = Field(None, description="Password for the broker login.")
    password_file: Path | None = Field(
        None, description="File holding the password (its trailing newline is ignored); wins over password."
    )
    tls: bool = Field(False, description="Use TLS. Implied by tls_ca_file; system CAs when no CA file is set.")
    tls_ca_file: Path | None = Field(None, description="CA certificate (PEM) that signed the broker's certificate.")
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of the client certificate.")
    tls_insecure: bool = Field(False, description="Skip the broker host name check. For testing only.")
    client_id: str | None = Field(None, description="MQTT client id. Unset: rkllm-mqtt-<node_id>.")
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive in seconds.")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT protocol: auto tries 5 and falls back to 3.1.1 when the broker refuses it."
    )
    base_topic: str = Field("rkllm", description="First level of every topic of this bridge.")
    node_id: str = Field(
        default_factory=lambda: topic_safe(socket.gethostname()),
        description="Second topic level, one per board. Default: the host name, made topic-safe.",
    )

    @field_validator("base_topic")
    @classmethod
    def _base_topic_is_plain(cls, value: str) -> str:
        if not value or any(ch in value for ch in "+#") or value.startswith(("$", "/")) or value.endswith("/"):
            raise ValueError("must be a plain topic without wildcards, leading '$' or '/', or trailing '/'")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id_is_one_level(cls, value: str) -> str:
        if topic_safe(value) != value:
            raise ValueError("must be one topic level of letters, digits, '_' and '-'")
        return value

    def resolved_password(self) -> SecretStr | None:
        """The password, read from ``password_file`` when set (without its trailing newline)."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc}") from exc
            return SecretStr(text.rstrip("\r\n"))
        return self.password

    def resolved_client_id(self) -> str:
        return self.client_id or f"rkllm-mqtt-{self.node_id}"

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None


class LoraAdapter(_Section):
    path: str = Field(description="Path of the LoRA adapter file (.rkllm).")
    name: str = Field(description="Name of the adapter, used to select it for generation.")
    scale: float = Field(1.0, description="Scale applied to the adapter.")


class RuntimeSettings(_Section):
    library: str | None = Field(
        None,
        description='Runtime library: "sim" (bundled simulated runtime), a library name or an absolute path. '
        'Unset: "sim" when model_path is unset, else "librkllmrt.so".',
    )
    abi: Literal["auto", "1.2", "1.3"] = Field(
        "auto",
        description='Struct layout of the runtime: "1.2" (runtimes 1.2.1-1.2.3), "1.3" (1.3.0), '
        '"auto" (read the version stored in the library; refuses when unsure).',
    )
    model_path: str | None = Field(None, description="The .rkllm model file (or a sim: spec for the simulator).")
    model_name: str | None = Field(None, description="Name shown to users. Unset: the model file's stem.")
    max_context_len: int = Field(4096, ge=16, description="Context window in tokens.")
    max_new_tokens: int = Field(512, ge=1, description="Upper bound of generated tokens per request.")
    top_k: int = Field(1, ge=1, description="Top-K sampling.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Top-P (nucleus) sampling.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature.")
    repeat_penalty: float = Field(1.1, ge=0.0, description="Penalty for repeated tokens.")
    frequency_penalty: float = Field(0.0, description="Penalty for frequent tokens.")
    presence_penalty: float = Field(0.0, description="Penalty for tokens present in the input.")
    skip_special_token: bool = Field(True, description="Drop special tokens from the output.")
    enabled_cpus_mask: int | None = Field(
        None, ge=0, le=0xFF, description="CPU cores the runtime may use, as a bit mask (RK3588 big cores: 0xF0)."
    )
    embed_flash: bool = Field(False, description="Read word embeddings from flash to save memory.")
    system_prompt: str = Field("", description="Default system prompt (a request's `system` wins).")
    prompt_prefix: str | None = Field(None, description="Chat template text before the user message.")
    prompt_postfix: str | None = Field(None, description="Chat template text after the user message.")
    lora_adapters: list[LoraAdapter] = Field(
        default_factory=list, description="LoRA adapters loaded at start; the first one is applied to requests."
    )
    prompt_cache_path: str | None = Field(None, description="Prompt cache file loaded at start when it exists.")
    restart_backoff_s: float = Field(1.0, gt=0, description="First delay before restarting a failed runtime.")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="Longest delay between runtime restarts.")

    def resolved_library(self) -> str:
        if self.library:
            return self.library
        return SIM_LIBRARY if self.model_path is None else VENDOR_LIBRARY

    @property
    def is_simulated(self) -> bool:
        return self.resolved_library() == SIM_LIBRARY


class LimitsSettings(_Section):
    max_prompt_bytes: int = Field(16384, ge=1, description="Largest prompt in UTF-8 bytes.")
    queue_size: int = Field(8, ge=0, description="Requests that may wait behind the running one.")
    request_timeout_s: float = Field(300.0, gt=0, description="Longest a request may run; timeout_s may lower it.")
    hang_grace_s: float = Field(
        15.0, gt=0, description="How long rkllm_run may take to return after an abort before the worker is killed."
    )
    stream_interval_ms: int = Field(
        0, ge=0, description="Coalesce stream chunks over this many ms (0: one message per token)."
    )
    response_topic_prefixes: list[str] = Field(
        default_factory=lambda: ["{base_topic}/reply"],
        description="Reply topics a request may name must lie under one of these ({base_topic} is replaced).",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On stop, how long the running request may finish before it is aborted."
    )


class HomeAssistantSettings(_Section):
    enabled: bool = Field(True, description="Publish Home Assistant MQTT discovery.")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    status_topic: str = Field(
        "homeassistant/status",
        description="Where Home Assistant publishes its birth message ('online'); discovery is re-announced then.",
    )
    device_name: str | None = Field(None, description="Device name in Home Assistant. Unset: 'RKLLM <node_id>'.")


class ClusterSettings(_Section):
    enabled: bool = Field(False, description="Also take requests from the shared group topic {base_topic}/prompt.")
    group: str = Field("rkllm", description="Shared subscription group name.")


class DaemonSettings(_Section):
    state_dir: Path | None = Field(
        None,
        description="Directory for the daemon's state (the record of answered request ids). Unset: systemd's "
        "StateDirectory (/var/lib/rkllm-mqtt) when writable, else $XDG_STATE_HOME/rkllm-mqtt.",
    )


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["console", "json"] | None = Field(
        None, description='"console" or "json". Unset: console on a terminal, JSON lines otherwise (journald).'
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    # Where the file values came from; set by load_settings, not a setting itself.
    _source_file: Path | None = PrivateAttr(None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file; the file's values arrive as init arguments.
        return (env_settings, init_settings)

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @property
    def embedded_broker(self) -> bool:
        return self.mqtt.host is None

    def reply_prefixes(self) -> list[str]:
        return [p.replace("{base_topic}", self.mqtt.base_topic) for p in self.limits.response_topic_prefixes]

    def masked(self) -> dict[str, Any]:
        """Effective settings as plain data, secrets shown as ``**********``."""
        data = self.model_dump(mode="json")
        data["runtime"]["library"] = self.runtime.resolved_library()
        data["mqtt"]["client_id"] = self.mqtt.resolved_client_id()
        data["limits"]["response_topic_prefixes"] = self.reply_prefixes()
        return data


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except PermissionError as exc:
        raise ConfigError(f"config file {path} cannot be read: permission denied") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _suggest(section_model: type[BaseModel] | None, key: str) -> str:
    if section_model is None:
        return ""
    close = difflib.get_close_matches(key, list(section_model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_SECTIONS: dict[str, type[BaseModel]] = {
    "mqtt": MqttSettings,
    "runtime": RuntimeSettings,
    "limits": LimitsSettings,
    "homeassistant": HomeAssistantSettings,
    "cluster": ClusterSettings,
    "daemon": DaemonSettings,
    "logging": LoggingSettings,
}


def _describe(error: Any, file_data: dict[str, Any], path: Path | None) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    section = loc[0] if loc else ""
    in_file = path is not None and section in file_data and (len(loc) < 2 or loc[1] in file_data[section])
    if in_file:
        origin = f"in {path}"
    else:
        env_name = ENV_PREFIX + "__".join(part.upper() for part in loc[:2])
        origin = f"from the environment ({env_name})" if path is None else f"in {path} or {env_name}"
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            hint = _suggest(Settings, loc[0])
            return f"unknown section or key '{key}' {origin}{hint}"
        hint = _suggest(_SECTIONS.get(section), loc[-1])
        return f"unknown key '{key}' {origin}{hint}"
    return f"{key}: {error['msg']} {origin} (got {error.get('input')!r})"


def load_settings(path: Path | None = None, *, required: bool = False) -> Settings:
    """Load the settings from ``path`` (or the default file when it exists) and the environment.

    ``required`` makes a missing file an error; the default file may be absent (zero configuration).
    """
    file_path = path
    if file_path is None and DEFAULT_CONFIG_PATH.exists():
        file_path = DEFAULT_CONFIG_PATH
    file_data: dict[str, Any] = {}
    if file_path is not None:
        if not file_path.exists() and not required and path is None:
            file_path = None
        else:
            file_data = _read_toml(file_path)
    try:
        settings = Settings(**file_data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, file_data, file_path) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    settings._source_file = file_path
    return settings
