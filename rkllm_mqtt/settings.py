"""Settings: a TOML file overridden by ``RKLLM_MQTT_<SECTION>__<KEY>`` environment variables.

Every section forbids unknown keys: a misspelled key in a config file must stop the daemon with
the key named, not be ignored while the user wonders why the setting has no effect. The same holds for the
environment: every variable starting with ``RKLLM_MQTT_`` must name a key, so the variables are read here
(not by pydantic-settings, which skips a name it does not recognise).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rkllm_mqtt.errors import ConfigError
from rkllm_mqtt.topics import topic_name_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 boards only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/rkllm-mqtt/config.toml")
ENV_PREFIX = "RKLLM_MQTT_"
SIM_LIBRARY = "sim"
VENDOR_LIBRARY = "librkllmrt.so"

_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# The base topic is the first level(s) of every topic the bridge builds; ids and reply levels follow it.
MAX_BASE_TOPIC_BYTES = 1024


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
    tls_insecure: bool = Field(
        False,
        description="Skip the check that the broker's certificate names mqtt.host; the chain is still verified.",
    )
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
        # Every topic of the bridge starts with it: a character the broker refuses would silence the bridge.
        problem = topic_name_problem(value, max_bytes=MAX_BASE_TOPIC_BYTES)
        if problem is not None:
            raise ValueError(f"is not a topic the broker accepts: it {problem}")
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
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror or exc}"
                ) from exc
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
        'Unset: "sim" when model_path is unset or a sim: spec, else "librkllmrt.so".',
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
        # A `sim:` spec only means something to the simulated runtime: it picks the simulator as well.
        simulated = self.model_path is None or self.model_path.startswith("sim:")
        return SIM_LIBRARY if simulated else VENDOR_LIBRARY

    @property
    def is_simulated(self) -> bool:
        return self.resolved_library() == SIM_LIBRARY


class LimitsSettings(_Section):
    max_prompt_bytes: int = Field(16384, ge=1, description="Largest prompt in UTF-8 bytes.")
    max_system_bytes: int = Field(16384, ge=1, description="Largest system prompt a request may send, in UTF-8 bytes.")
    max_reply_topic_bytes: int = Field(
        256, ge=1, le=65535, description="Longest reply topic a request may name, in UTF-8 bytes."
    )
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
    final_retain_s: int = Field(
        60,
        ge=0,
        le=86400,
        description="Keep each final response retained this long, so a client that subscribes after asking still "
        "gets it (MQTT 5: message expiry; 3.1.1: the bridge clears it). 0: finals are not retained.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On stop, how long the running request may finish before it is aborted."
    )


class HomeAssistantSettings(_Section):
    enabled: bool = Field(
        True,
        description="Publish Home Assistant MQTT discovery. Unset: on with mqtt.host, off on the embedded broker "
        "(Home Assistant cannot reach 127.0.0.1).",
    )
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


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ApiSettings(_Section):
    enabled: bool = Field(False, description="Serve the Ollama-compatible HTTP API (Home Assistant Assist).")
    host: str = Field(
        "127.0.0.1",
        description="Address the API listens on. Anything but loopback exposes the NPU to the network: set a token.",
    )
    port: int = Field(11434, ge=1, le=65535, description="TCP port of the API (Ollama's own port by default).")
    token: SecretStr | None = Field(
        None, description="When set, every API request must carry 'Authorization: Bearer <token>'."
    )

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["console", "json"] | None = Field(
        None, description='"console" or "json". Unset: console on a terminal, JSON lines otherwise (journald).'
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        validate_default=True,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
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
        # load_settings merges the environment over the file (see env_overrides) and passes both as init
        # arguments, so it can refuse any variable that names no key and say where each value came from.
        return (init_settings,)

    @model_validator(mode="after")
    def _discovery_off_on_the_embedded_broker(self) -> Settings:
        # Home Assistant cannot reach a broker on 127.0.0.1, so discovery there only fills the broker with
        # retained configs nobody reads. An explicit homeassistant.enabled (file or environment) still wins.
        ha = self.homeassistant
        if self.embedded_broker and "enabled" not in ha.model_fields_set:
            ha.enabled = False
            ha.model_fields_set.discard("enabled")  # still the default: discovery_defaulted_off says why
        return self

    @property
    def discovery_defaulted_off(self) -> bool:
        """Discovery is off only because the broker is the embedded one (nothing set it explicitly)."""
        ha = self.homeassistant
        return self.embedded_broker and not ha.enabled and "enabled" not in ha.model_fields_set

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


def _sections() -> dict[str, type[BaseModel]]:
    """Every section of the settings and its model, read from ``Settings`` so a new section is known at once."""
    sections: dict[str, type[BaseModel]] = {}
    for name, info in Settings.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            sections[name] = info.annotation
    return sections


def _mentions(annotation: Any, wanted: type) -> bool:
    if annotation is wanted:
        return True
    return any(_mentions(arg, wanted) for arg in typing.get_args(annotation))


def _json_form(annotation: Any) -> str | None:
    """How a value of this type is written in an environment variable, when it is JSON (lists, tables)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        forms = [_json_form(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return next((form for form in forms if form), None)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return 'a JSON array of objects, for example \'[{"path": "/models/a.rkllm", "name": "a"}]\''
        return 'a JSON array, for example \'["rkllm/reply", "nodered/rkllm"]\''
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return 'a JSON object, for example \'{"key": "value"}\''
    return None


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _secret_keys() -> set[tuple[str, str]]:
    return {
        (section, key)
        for section, model in _sections().items()
        for key, info in model.model_fields.items()
        if _mentions(info.annotation, SecretStr)
    }


@dataclass(frozen=True)
class EnvOverrides:
    """The ``RKLLM_MQTT_<SECTION>__<KEY>`` variables of an environment, as settings data."""

    data: dict[str, dict[str, Any]]
    origins: dict[tuple[str, str], str]  # (section, key) -> the variable that set it


def env_overrides(environ: Mapping[str, str]) -> EnvOverrides:
    """Read every variable whose name starts with ``RKLLM_MQTT_``; raise ConfigError for any that names no key.

    Names are matched without regard to case. Lists and tables are JSON; anything else is passed on as text and
    validated (and converted) with the rest of the settings.
    """
    valid = {
        _env_name(section, key): (section, key) for section, model in _sections().items() for key in model.model_fields
    }
    data: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        target = valid.get(name.upper())
        if target is None:
            close = difflib.get_close_matches(name.upper(), list(valid), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"unknown environment variable {name}{hint}; variables are named {ENV_PREFIX}<SECTION>__<KEY>, "
                "with two underscores between section and key"
            )
            continue
        section, key = target
        value: Any = environ[name]
        form = _json_form(_sections()[section].model_fields[key].annotation)
        if form is not None:
            try:
                value = json.loads(value)
            except ValueError:
                problems.append(f"{name} ({section}.{key}) cannot be parsed: expected {form}")
                continue
        data.setdefault(section, {})[key] = value
        origins[(section, key)] = name
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return EnvOverrides(data, origins)


def _merge(file_data: dict[str, Any], env: EnvOverrides) -> dict[str, Any]:
    merged = dict(file_data)
    for section, values in env.data.items():
        from_file = merged.get(section)
        merged[section] = {**from_file, **values} if isinstance(from_file, dict) else dict(values)
    return merged


def _describe(error: Any, path: Path | None, env: EnvOverrides) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    section = loc[0] if loc else ""
    variable = env.origins.get((loc[0], loc[1])) if len(loc) >= 2 else None
    if variable is not None:
        origin = f"from the environment ({variable})"
    elif path is not None:
        origin = f"in {path}"
    else:
        origin = "(a default)"
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            hint = _suggest(Settings, loc[0])
            return f"unknown section or key '{key}' {origin}{hint}"
        hint = _suggest(_sections().get(section), loc[-1])
        return f"unknown key '{key}' {origin}{hint}"
    if variable is not None:
        message = f"{variable} ({key}): {error['msg']}"
        form = _json_form(_sections()[loc[0]].model_fields[loc[1]].annotation)
        if form is not None:
            message += f"; expected {form}"
    else:
        message = f"{key}: {error['msg']} {origin}"
    if len(loc) >= 2 and (loc[0], loc[1]) in _secret_keys():
        # Never echo a secret, whatever its type: this message ends up in the journal.
        return f"{message} (value not shown: it is a secret)"
    return f"{message} (got {error.get('input')!r})"


def load_settings(
    path: Path | None = None, *, required: bool = False, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load the settings from ``path`` (or the default file when it exists) and the environment.

    ``required`` makes a missing file an error; the default file may be absent (zero configuration). A password
    file that cannot be read is a configuration error here, so every command stops on it the same way.
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
    env = env_overrides(os.environ if environ is None else environ)
    try:
        settings = Settings(**_merge(file_data, env))
    except ValidationError as exc:
        problems = "; ".join(_describe(err, file_path, env) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    settings._source_file = file_path
    settings.mqtt.resolved_password()  # ConfigError naming the file and the reason
    return settings
