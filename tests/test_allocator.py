"""serve runs on the C library's heap: it starts itself again once with PYTHONMALLOC set, keeping its pid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rkllm_mqtt import exit_codes

from .helpers import serve_on_a_taken_port

_SHOW = (
    "import os; from rkllm_mqtt.allocator import use_c_heap; "
    "print(os.getpid(), os.environ.get('PYTHONMALLOC')); use_c_heap()"
)


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC" and not k.startswith("RKLLM_MQTT_")}
    env.update(extra)
    return env


def test_the_process_starts_again_once_with_the_c_heap_and_the_same_pid() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SHOW], check=True, capture_output=True, text=True, timeout=120, env=_environment()
    )
    lines = result.stdout.split()
    assert len(lines) == 4, result.stdout
    first_pid, first_choice, second_pid, second_choice = lines
    assert first_choice == "None" and second_choice == "malloc"
    assert first_pid == second_pid


@pytest.mark.parametrize("chosen", ["pymalloc", "malloc"])
def test_an_allocator_the_environment_chose_is_kept(chosen: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SHOW],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(PYTHONMALLOC=chosen),
    )
    assert result.stdout.split()[1:] == [chosen]


def test_serve_reports_the_allocator_it_runs_on() -> None:
    # serve is the command that chooses it; it exits early here (its port is taken) after its first log line.
    result = serve_on_a_taken_port(unset=("PYTHONMALLOC",))
    assert result.returncode == exit_codes.EMBEDDED_BROKER_FAILED
    starting = [line for line in result.stderr.splitlines() if "starting" in line]
    assert len(starting) == 1, result.stderr
    assert "malloc" in starting[0] and "pymalloc" not in starting[0]
