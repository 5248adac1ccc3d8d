"""The shipped systemd files: the unit passes ``systemd-analyze verify``, the sysusers file creates the user.

``systemd-analyze verify`` needs the ExecStart binary to exist, so the unit is copied next to a stand-in
executable and its ExecStart path rewritten; nothing else in the unit changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "rkllm-mqtt.service"
SYSUSERS = REPO / "systemd" / "sysusers.d" / "rkllm-mqtt.conf"
EXEC_PATH = "/opt/rkllm-mqtt/bin/rkllm-mqtt"

# Keys newer than the oldest systemd the unit supports (Debian 12 has 252). Older systemd warns
# "Unknown key" for them and ignores them, which leaves a valid unit with a fixed RestartSec.
KEYS_NEWER_THAN = {"RestartSteps": 254, "RestartMaxDelaySec": 254}

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def systemd_version() -> int:
    assert ANALYZE is not None
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match is not None, out
    return int(match.group(1))


def unit_with_stand_in(tmp_path: Path) -> Path:
    binary = tmp_path / "bin" / "rkllm-mqtt"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={EXEC_PATH} " in text
    unit = tmp_path / "rkllm-mqtt.service"
    unit.write_text(text.replace(EXEC_PATH, str(binary)), encoding="utf-8")
    return unit


def allowed_warning(message: str, version: int) -> bool:
    match = re.search(r"Unknown key '?(\w+)'? in section \[Service\]", message)
    if match is None:
        return False
    newer = KEYS_NEWER_THAN.get(match.group(1))
    return newer is not None and version < newer


def test_unit_verifies(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = unit_with_stand_in(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    version = systemd_version()
    problems = [text for text in output.splitlines() if text.strip() and not allowed_warning(text, version)]
    assert problems == [], "\n".join(problems)
    assert "Failed" not in output


def test_unit_essentials() -> None:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        text = raw.strip()
        if not text or text.startswith(("#", "[")):
            continue
        key, _, value = text.partition("=")
        settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["User"] == ["rkllm-mqtt"]
    assert settings["SupplementaryGroups"] == ["render video"]
    assert settings["ExecStart"] == [f"{EXEC_PATH} serve --config /etc/rkllm-mqtt/config.toml"]
    assert "PYTHONUNBUFFERED=1" in settings["Environment"]
    assert "PYTHONMALLOC=malloc" in settings["Environment"]  # memory given back after a flood, no second start
    assert settings["DevicePolicy"] == ["closed"]
    assert "/dev/rknpu rw" in settings["DeviceAllow"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["KillMode"] == ["mixed"]
    assert settings["OOMPolicy"] == ["continue"]
    # The record of answered request ids lives there (daemon.state_dir defaults to it, docs/reliability.md).
    assert settings["StateDirectory"] == ["rkllm-mqtt"]
    # cffi's ffi.callback needs write+execute memory: the unit must not forbid it (docs/systemd.md).
    assert "MemoryDenyWriteExecute" not in settings
    # The daemon's stop takes at most shutdown_grace_s + hang_grace_s (10 + 15 s by default).
    assert int(settings["TimeoutStopSec"][0].rstrip("s")) > 25


def test_security_exposure_is_reported(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = unit_with_stand_in(tmp_path)
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if "offline" in result.stderr and "Unknown option" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert 0.0 <= float(match.group(1)) <= 10.0


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    user = next(entry for entry in passwd.splitlines() if entry.startswith("rkllm-mqtt:"))
    assert user.endswith(":/var/lib/rkllm-mqtt:/usr/sbin/nologin")
    members = {entry.split(":")[0]: entry.split(":")[3] for entry in group.splitlines()}
    assert "rkllm-mqtt" in members["render"].split(",")
    assert "rkllm-mqtt" in members["video"].split(",")
