"""End to end: the Ollama API of a running daemon (simulated runtime, real worker, real broker), through the
official ``ollama`` client, sharing one queue with MQTT requests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Probe, wait_ready
from .helpers import free_port

MODEL = "simulated:latest"
WAIT_S = 30.0
# Slow enough that a request is surely still running when the test acts on it (the abort ends it at once).
SLOW = "sim:rate=50,prefill_ms=0,tokens=100000"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device or entity",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
    }
]


@pytest.fixture
def probe(amqtt_broker: EmbeddedBroker) -> Iterator[Probe]:
    client = Probe(amqtt_broker.port).start()
    yield client
    client.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return tmp_path / "sim-trace.log"


def launch(
    daemons: list[Daemon],
    tmp_path: Path,
    probe: Probe,
    *,
    model: str = "sim:rate=0,prefill_ms=0,tokens=12",
    trace: Path | None = None,
    **api: Any,
) -> tuple[Daemon, str]:
    port = free_port()
    daemon = Daemon(
        tmp_path,
        probe.port,
        api={"enabled": True, "port": port, **api},
        runtime={"model_path": model, "library": "sim", "restart_backoff_s": 0.2},
    ).start(extra_env={"RKLLM_SIM_TRACE": str(trace)} if trace else None)
    daemons.append(daemon)
    wait_ready(probe, daemon)
    probe.subscribe(f"{daemon.root}/#")
    return daemon, f"http://127.0.0.1:{port}"


def wait_log(daemon: Daemon, event: str, count: int = 1, timeout: float = WAIT_S) -> list[dict[str, Any]]:
    """The daemon's log lines of ``event``, once there are ``count`` (the log reaches its file a little later)."""
    deadline = time.monotonic() + timeout
    while len(found := [e for e in daemon.logs() if e.get("event") == event]) < count:
        assert time.monotonic() < deadline, f"the daemon never logged {event}"
        time.sleep(0.05)
    return found


def runs_in(trace: Path) -> list[tuple[str, str]]:
    """The run lines of the simulated runtime's trace: ("start", line) and ("end", line), in order."""
    out = []
    for line in trace.read_text().splitlines():
        if line.startswith("rkllm_run keep_history"):
            out.append(("start", line))
        elif line.startswith("sim_run end"):
            out.append(("end", line))
    return out


def test_models_chat_and_generate(daemons: list[Daemon], tmp_path: Path, probe: Probe) -> None:
    daemon, url = launch(daemons, tmp_path, probe)
    client = ollama.Client(host=url)
    assert [m.model for m in client.list().models] == [MODEL]
    assert [m.model for m in client.ps().models] == [MODEL]
    shown = client.show(MODEL)
    assert shown.modelinfo is not None and shown.modelinfo["rkllm.abi"] == "1.3"
    assert client.pull("simulated").status == "success"

    answer = client.chat(MODEL, messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    assert (answer.message.content or "").startswith("[turn 1] [system: Be kind.] You said: hi. ")
    assert answer.done_reason == "stop" and answer.eval_count == 12
    streamed = list(client.chat(MODEL, messages=[{"role": "user", "content": "hello there"}], stream=True))
    text = "".join(p.message.content or "" for p in streamed)
    assert text.startswith("[turn 1] You said: hello there.")
    assert len(streamed) == 13 and streamed[-1].done  # one line per token, then the final one
    assert client.generate(MODEL, "one two").response.startswith("[turn 1] You said: one two.")
    thought = client.chat(MODEL, messages=[{"role": "user", "content": "think"}], think=True)
    assert thought.message.thinking == "\nthinking it over\n"
    assert (thought.message.content or "").startswith("[turn 1] You said: think.")
    unasked = client.chat(MODEL, messages=[{"role": "user", "content": "think"}], think=False)
    assert not unasked.message.thinking and "<think>" not in (unasked.message.content or "")
    sampled = client.generate(MODEL, "sampled", options={"temperature": 0.2, "top_k": 5, "top_p": 0.5})
    assert sampled.done_reason == "stop"  # per-request sampling reached the 1.3 runtime without an error
    limited = client.generate(MODEL, "short", options={"num_predict": 3})
    assert limited.response == "[turn 1] You " and limited.done_reason == "length"
    # The HTTP requests count on the MQTT state like any other.
    probe.wait_json(f"{daemon.root}/state", lambda s: s.get("requests_total") == 7 and s.get("status") == "idle")


def test_tool_call_round_trip_keeps_the_conversation_in_the_kv_cache(
    daemons: list[Daemon], tmp_path: Path, probe: Probe, trace: Path
) -> None:
    _, url = launch(daemons, tmp_path, probe, model="sim:rate=0,prefill_ms=0,tokens=12,tool_call=json", trace=trace)
    client = ollama.Client(host=url)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You control the house."},
        {"role": "user", "content": "Please HassTurnOn name=kitchen"},
    ]
    first = client.chat(MODEL, messages=messages, tools=TOOLS)
    calls = first.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("HassTurnOn", {"name": "kitchen"})]
    assert "<tool_call>" not in (first.message.content or "")
    # What Home Assistant does next: run the tool, send the call and its result back with the whole history.
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": json.dumps({"success": True})},
    ]
    second = client.chat(MODEL, messages=messages, tools=TOOLS)
    # Turn 2 of the same KV cache: only the tool's result was sent, as role "tool".
    assert (second.message.content or "").startswith('[turn 2] [system: You control the house.] You said: {"success"')
    assert not second.message.tool_calls
    lines = trace.read_text().splitlines()
    assert sum(line.startswith("rkllm_set_function_tools") for line in lines) == 1
    assert "role=tool" in [line for line in lines if line.startswith("rkllm_run keep_history")][-1]
    assert second.prompt_eval_count == 2  # the tool result alone was prefilled


def test_errors_have_ollama_shapes_and_statuses(daemons: list[Daemon], tmp_path: Path, probe: Probe) -> None:
    _, url = launch(daemons, tmp_path, probe)
    client = ollama.Client(host=url)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(MODEL, "hi", options={"top_k": 0})
    assert caught.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("llama3.2")
    assert caught.value.status_code == 404
    broken = httpx.post(f"{url}/api/generate", content=b'{"model": ')
    assert broken.status_code == 400 and broken.json()["error"].startswith("the body is not valid JSON")


def test_bearer_token(daemons: list[Daemon], tmp_path: Path, probe: Probe) -> None:
    daemon, url = launch(daemons, tmp_path, probe, token="kitchen-secret")
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=url).list()
    assert caught.value.status_code == 401
    client = ollama.Client(host=url, headers={"Authorization": "Bearer kitchen-secret"})
    assert client.generate(MODEL, "hi").done
    assert "kitchen-secret" not in daemon.log_path.read_text()


def test_http_and_mqtt_share_one_queue_and_never_overlap(
    daemons: list[Daemon], tmp_path: Path, probe: Probe, trace: Path
) -> None:
    daemon, url = launch(daemons, tmp_path, probe, model="sim:rate=400,prefill_ms=5,tokens=12", trace=trace)
    client = ollama.Client(host=url)
    answers: list[str] = []
    lock = threading.Lock()

    def ask_http(index: int) -> None:
        text = client.generate(MODEL, f"http {index}").response or ""
        with lock:
            answers.append(text)

    threads = [threading.Thread(target=ask_http, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for index in range(4):
        probe.publish(f"{daemon.root}/prompt", json.dumps({"prompt": f"mqtt {index}", "id": f"m{index}"}))
    for thread in threads:
        thread.join(WAIT_S)
    for index in range(4):
        probe.wait_json(f"{daemon.root}/response/m{index}", lambda r: r.get("state") == "done")
    assert sorted(a.split(".")[0] for a in answers) == [f"[turn 1] You said: http {i}" for i in range(4)]
    runs = runs_in(trace)
    assert len(runs) == 16
    assert [kind for kind, _ in runs] == ["start", "end"] * 8  # every run ends before the next one starts
    started = wait_log(daemon, "request_done", count=8)
    assert sorted(e.get("source") for e in started) == ["http"] * 4 + ["mqtt"] * 4


def test_http_request_shows_on_mqtt_state_and_the_abort_topic_stops_it(
    daemons: list[Daemon], tmp_path: Path, probe: Probe
) -> None:
    daemon, url = launch(daemons, tmp_path, probe, model=SLOW)
    outcome: list[BaseException | Any] = []

    def ask() -> None:
        try:
            outcome.append(ollama.Client(host=url).chat(MODEL, messages=[{"role": "user", "content": "go on"}]))
        except ollama.ResponseError as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    busy = probe.wait_json(f"{daemon.root}/state", lambda s: str(s.get("request_id") or "").startswith("http-"))
    assert busy["status"] == "busy" and busy["request_source"] == "http"
    probe.publish(f"{daemon.root}/abort", busy["request_id"])
    asker.join(WAIT_S)
    (result,) = outcome
    assert isinstance(result, ollama.ResponseError)
    assert "abort" in result.error
    probe.wait_json(f"{daemon.root}/state", lambda s: s.get("status") == "idle" and s.get("requests_total") == 1)


def test_client_that_disconnects_aborts_its_generation(daemons: list[Daemon], tmp_path: Path, probe: Probe) -> None:
    daemon, url = launch(daemons, tmp_path, probe, model=SLOW)
    with (
        httpx.Client(base_url=url, timeout=WAIT_S) as http,
        http.stream(
            "POST", "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "go on"}]}
        ) as response,
    ):
        line = next(response.iter_lines())
        assert json.loads(line)["done"] is False
    # The connection is closed mid-stream: the run (100,000 tokens at 50 a second) ends at once, aborted.
    probe.wait_json(f"{daemon.root}/state", lambda s: s.get("status") == "idle" and s.get("requests_total") == 1)
    (done,) = wait_log(daemon, "request_done")
    assert done["code"] == "aborted" and str(done["request_id"]).startswith("http-")
    (gone,) = wait_log(daemon, "api_client_gone")
    assert gone["request_id"] == done["request_id"]


def test_serve_exits_with_its_own_code_when_the_api_port_is_taken(tmp_path: Path, probe: Probe) -> None:
    from rkllm_mqtt import exit_codes

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(tmp_path, probe.port, api={"enabled": True, "port": port}).start()
        try:
            assert daemon.proc is not None
            assert daemon.proc.wait(WAIT_S) == exit_codes.API_FAILED
        finally:
            daemon.stop()
    (failed,) = wait_log(daemon, "api_start_failed")
    assert str(port) in failed["error"]
