"""What the worker process is started with: its environment and its interpreter's flags."""

from __future__ import annotations

import json
import sys

from rkllm_mqtt.runtime.workerproc import worker_command, worker_environment


def test_the_environment_keeps_what_the_runtime_needs_and_nothing_else() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/rkllm-mqtt",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "LD_LIBRARY_PATH": "/opt/rkllm/lib",
        "RKLLM_LOG_LEVEL": "1",
        "RKNN_LOG_LEVEL": "0",
        "RKLLM_SIM_TRACE": "/tmp/trace",
        "RKLLM_MQTT_MQTT__PASSWORD": "secret",
        "RKLLM_MQTT_CONFIG": "/etc/rkllm-mqtt/config.toml",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "PYTHONPATH": "/somewhere",
    }
    kept = worker_environment(environ)
    assert kept == {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/rkllm-mqtt",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "LD_LIBRARY_PATH": "/opt/rkllm/lib",
        "RKLLM_LOG_LEVEL": "1",
        "RKNN_LOG_LEVEL": "0",
        "RKLLM_SIM_TRACE": "/tmp/trace",
    }


def test_the_worker_runs_isolated_with_the_daemons_import_path() -> None:
    command = worker_command(7)
    assert command[:3] == [sys.executable, "-I", "-c"]
    assert json.loads(command[4]) == sys.path
    assert command[5:] == ["--event-fd", "7"]
