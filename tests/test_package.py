"""Importing the package changes nothing; its version comes from the installed metadata."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import rkllm_mqtt


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_the_version_is_the_installed_distributions() -> None:
    assert rkllm_mqtt.__version__ == metadata.version(rkllm_mqtt.DISTRIBUTION)


def test_importing_the_package_leaves_sys_modules_alone() -> None:
    out = _run(
        "import sys; before = dict(sys.modules); import rkllm_mqtt; "
        "changed = [m for m in before if sys.modules.get(m) is not before[m]]; "
        "print(changed, 'rich' in sys.modules)"
    )
    assert out == "[] False"


def test_the_command_keeps_rich_out_before_structlog_loads() -> None:
    assert _run("import sys, rkllm_mqtt.cli; print(sys.modules['rich'] is None)") == "True"


def test_the_daemon_leaves_the_http_api_unloaded_while_it_is_off() -> None:
    # aiohttp and jsonschema cost the daemon's resident memory about 14 MB; most installs never enable the API.
    loaded = _run(
        "import sys, rkllm_mqtt.cli, rkllm_mqtt.daemon; print(sorted({'aiohttp', 'jsonschema'} & set(sys.modules)))"
    )
    assert loaded == "[]"
