"""A real Home Assistant for the live run: its own venv from the package index, a configuration written from
files, and the process itself on loopback ports.

Home Assistant sets MQTT up through a config entry, not configuration.yaml; the entry is written into
``.storage/core.config_entries`` before the start, as the integration's setup dialog would have stored it.
The integrations' own requirements are installed with Home Assistant, so it runs with ``--skip-pip`` and
never installs anything at start.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

VERSION = "2025.4.4"
# Integrations the run loads whose requirements Home Assistant would otherwise install at start (the frontend is
# one of them: Home Assistant falls back to recovery mode without it).
REQUIREMENT_DOMAINS = ("frontend", "mqtt", "recorder")
# Loggers whose errors concern what the run loads; errors of the machine (no ffmpeg, no libturbojpeg, no
# Bluetooth) are not the examples' business.
WATCHED_LOGGERS = re.compile(
    r"\[homeassistant\.(components\.(mqtt|script|automation|recorder|template|notify|event|sensor|binary_sensor|"
    r"text|button|frontend)|helpers\.(script|template|config_validation|trigger)|config|setup)\b"
)


def _python_313() -> str:
    for candidate in (
        shutil.which("python3.13"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python"))),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("Home Assistant 2025.4 needs Python 3.13: install it or pass --python")


def ensure_venv(venv: Path, python: str | None, version: str = VERSION) -> Path:
    """The ``hass`` executable of ``venv``, creating the venv and installing Home Assistant when needed."""
    hass = venv / "bin" / "hass"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not hass.exists():
        print(f"installing Home Assistant {version} into {venv} (several minutes)", flush=True)
        subprocess.run([python or _python_313(), "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, f"homeassistant=={version}"], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import homeassistant.const as c; print(c.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if installed != version:
        raise RuntimeError(f"{venv} holds Home Assistant {installed}, not {version}: use another --hass-venv")
    requirements = []
    for domain in REQUIREMENT_DOMAINS:
        manifest = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                f"import homeassistant.components.{domain} as m, pathlib; "
                "print(pathlib.Path(m.__file__).with_name('manifest.json').read_text())",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        requirements.extend(json.loads(manifest).get("requirements", []))
    subprocess.run([*pip, *requirements], check=True)
    return hass


@dataclass
class HassConfig:
    """What goes into the configuration directory."""

    mqtt_port: int
    http_port: int
    protocol: str  # Home Assistant's MQTT protocol setting: "3.1.1" (its default) or "5"
    configuration: dict[str, Any]
    scripts: dict[str, Any]
    automations: list[dict[str, Any]]

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        configuration = {
            "http": {"server_host": "127.0.0.1", "server_port": self.http_port},
            "logger": {"default": "warning", "logs": {"homeassistant.setup": "info"}},
            **self.configuration,
        }
        includes = "script: !include scripts.yaml\nautomation: !include automations.yaml\n"
        (directory / "configuration.yaml").write_text(includes + _dump(configuration))
        (directory / "scripts.yaml").write_text(_dump(self.scripts))
        (directory / "automations.yaml").write_text(_dump(self.automations))
        storage = directory / ".storage"
        storage.mkdir(exist_ok=True)
        (storage / "core.config_entries").write_text(json.dumps(self._config_entries(), indent=2))

    def _config_entries(self) -> dict[str, Any]:
        now = datetime.now(timezone.utc).isoformat()
        entry = {
            "created_at": now,
            "data": {"broker": "127.0.0.1", "port": self.mqtt_port, "protocol": self.protocol},
            "discovery_keys": {},
            "disabled_by": None,
            "domain": "mqtt",
            "entry_id": uuid.uuid4().hex,
            "minor_version": 2,
            "modified_at": now,
            "options": {"discovery": True, "discovery_prefix": "homeassistant"},
            "pref_disable_new_entities": False,
            "pref_disable_polling": False,
            "source": "user",
            "subentries": [],
            "title": "127.0.0.1",
            "unique_id": None,
            "version": 1,
        }
        return {"version": 1, "minor_version": 5, "key": "core.config_entries", "data": {"entries": [entry]}}


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


class HomeAssistant:
    """``hass`` on a prepared configuration directory; stops it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, hass: Path, directory: Path) -> None:
        self.hass = hass
        self.directory = directory
        self.log_path = directory / "home-assistant.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HomeAssistant:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        with (self.directory / "hass.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [str(self.hass), "--config", str(self.directory), "--skip-pip", "--log-file", str(self.log_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_problems(self) -> list[str]:
        """Errors of the parts the run loads, and any complaint about invalid configuration."""
        if not self.log_path.exists():
            return []
        problems = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            serious = (" ERROR " in line or " CRITICAL " in line) and WATCHED_LOGGERS.search(line)
            if serious or "Invalid config" in line:
                problems.append(line)
        return problems


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


if __name__ == "__main__":  # pragma: no cover - python -m bench.ha_live.hass VENV: prepare the venv only
    print(ensure_venv(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
