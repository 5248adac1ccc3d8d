"""Function calling, thinking and conversation replay through the real worker, binding and simulated runtime."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
from rkllm_mqtt.settings import Settings

ABIS = ["1.2", "1.3"]
TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "HassTurnOn",
                "description": "Turns on a device",
                "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
            },
        }
    ]
)


class Sink:
    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.lock = threading.Lock()

    def text(self, chunk: str) -> None:
        with self.lock:
            self.chunks.append(chunk)

    def flush_deadline(self) -> float | None:
        return None

    def flush(self) -> None:
        return None


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "sim-trace.log"
    monkeypatch.setenv("RKLLM_SIM_TRACE", str(path))
    return path


def supervisor_for(abi: str, spec: str) -> RuntimeSupervisor:
    settings = Settings(runtime={"library": "sim", "abi": abi, "model_path": spec, "restart_backoff_s": 0.2})
    supervisor = RuntimeSupervisor(settings)
    supervisor.start()
    assert supervisor.wait_ready(30), supervisor.last_error
    return supervisor


@pytest.fixture(params=[("1.3", "json"), ("1.2", "xml")], ids=["1.3-json", "1.2-xml"])
def runtime(request: pytest.FixtureRequest, trace: Path) -> Iterator[tuple[RuntimeSupervisor, str]]:
    abi, form = request.param
    supervisor = supervisor_for(abi, f"sim:rate=0,prefill_ms=0,tokens=12,tool_call={form}")
    yield supervisor, form
    supervisor.stop()


def run(supervisor: RuntimeSupervisor, request: GenerationRequest) -> GenerationResult:
    return supervisor.generate(request, Sink(), CancelToken())


def trace_lines(path: Path, prefix: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(prefix)]


def test_tools_reach_the_runtime_and_a_named_tool_is_called(
    runtime: tuple[RuntimeSupervisor, str], trace: Path
) -> None:
    supervisor, form = runtime
    call = run(
        supervisor,
        GenerationRequest("please HassTurnOn name=kitchen", 20.0, session="s1", system="house", tools=TOOLS),
    )
    assert call.error_code is None
    if form == "json":
        assert '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen"}}\n</tool_call>' in call.text
    else:
        assert "<function=HassTurnOn>\n<parameter=name>\nkitchen\n</parameter>\n</function>" in call.text
    (tools_line,) = trace_lines(trace, "rkllm_set_function_tools")
    assert "system_prompt=house" in tools_line and f"tools_bytes={len(TOOLS)}" in tools_line
    assert "tool_response_str=tool_response" in tools_line
    # The tool's result goes back as role "tool" in the same conversation; the tools are not set again.
    answer = run(
        supervisor, GenerationRequest('{"success": true}', 20.0, session="s1", system="house", tools=TOOLS, role="tool")
    )
    assert answer.text.startswith('[turn 2] [system: house] You said: {"success": true}.')
    assert "role=tool" in trace_lines(trace, "rkllm_run")[-1]
    assert len(trace_lines(trace, "rkllm_set_function_tools")) == 1
    # Without tools the chat template comes back, and the model answers in text.
    plain = run(supervisor, GenerationRequest("please HassTurnOn", 20.0, system="house"))
    assert "<tool_call>" not in plain.text
    assert trace_lines(trace, "rkllm_set_chat_template")


def test_thinking_switch_reaches_the_runtime(runtime: tuple[RuntimeSupervisor, str], trace: Path) -> None:
    supervisor, _ = runtime
    result = run(supervisor, GenerationRequest("hi", 20.0, enable_thinking=True))
    assert result.text.startswith("<think>\n")
    assert "enable_thinking=1" in trace_lines(trace, "rkllm_run")[-1]


def test_a_conversation_the_cache_lost_is_replayed_whole(runtime: tuple[RuntimeSupervisor, str], trace: Path) -> None:
    supervisor, _ = runtime
    first = run(supervisor, GenerationRequest("one two", 20.0, session="c", replay_prompt="one two"))
    assert first.prompt_tokens == 2
    held = run(supervisor, GenerationRequest("three", 20.0, session="c", replay_prompt="one two answer three"))
    assert held.text.startswith("[turn 2]")  # the cache held it: only the new turn was prefilled
    assert held.prompt_tokens == 1
    run(supervisor, GenerationRequest("an mqtt request in between", 20.0))
    lost = run(
        supervisor, GenerationRequest("four", 20.0, session="c", replay_prompt="one two answer three answer four")
    )
    assert lost.text.startswith("[turn 1] You said: one two answer three answer four.")
    assert lost.prompt_tokens == 6
