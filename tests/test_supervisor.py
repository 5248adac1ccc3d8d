"""The runtime supervisor driving the real worker process, the real cffi binding and the C simulated runtime."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt.core.jobs import CancelReason, CancelToken, GenerationRequest
from rkllm_mqtt.errors import RequestError
from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
from rkllm_mqtt.settings import Settings

ABIS = ["1.2", "1.3"]


class CollectingSink:
    def __init__(self, signal_at: int = 1) -> None:
        self.chunks: list[str] = []
        self.signal_at = signal_at
        self.reached = threading.Event()  # set once ``signal_at`` chunks arrived

    def text(self, chunk: str) -> None:
        self.chunks.append(chunk)
        if len(self.chunks) >= self.signal_at:
            self.reached.set()

    def flush_deadline(self) -> float | None:
        return None

    def flush(self) -> None:
        return None


def make_settings(abi: str, model: str, **limits: Any) -> Settings:
    return Settings(
        runtime={"library": "sim", "abi": abi, "model_path": model, "restart_backoff_s": 0.2},
        limits={"hang_grace_s": 1.0, **limits},
    )


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "sim-trace.log"
    monkeypatch.setenv("RKLLM_SIM_TRACE", str(path))
    return path


def started(settings: Settings) -> RuntimeSupervisor:
    supervisor = RuntimeSupervisor(settings)
    supervisor.start()
    return supervisor


@pytest.fixture
def runtime(request: pytest.FixtureRequest) -> Iterator[RuntimeSupervisor]:
    abi, model = request.param
    supervisor = started(make_settings(abi, model))
    assert supervisor.wait_ready(20), supervisor.last_error
    yield supervisor
    supervisor.stop()


def ask(supervisor: RuntimeSupervisor, prompt: str, **fields: Any) -> tuple[Any, CollectingSink]:
    sink = CollectingSink()
    fields.setdefault("timeout_s", 20.0)
    result = supervisor.generate(GenerationRequest(prompt=prompt, **fields), sink, CancelToken())
    return result, sink


FAST = "sim:rate=0,prefill_ms=0,tokens=12"


@pytest.mark.parametrize("runtime", [(abi, FAST) for abi in ABIS], indirect=True, ids=ABIS)
def test_streamed_chunks_join_to_the_full_reply(runtime: RuntimeSupervisor) -> None:
    result, sink = ask(runtime, "hello world")
    assert result.finish_reason == "stop"
    assert result.error_code is None
    assert len(sink.chunks) == 12
    assert "".join(sink.chunks) == result.text
    assert result.text.startswith("[turn 1] You said: hello world. ")
    assert result.completion_tokens == 12
    assert result.ttft_ms is not None and result.ttft_ms >= 0
    info = runtime.model_info
    assert info is not None and info.abi == runtime.settings.runtime.abi


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("lang", ["zh", "emoji", "mixed"])
def test_utf8_split_across_callbacks_is_decoded_intact(abi: str, lang: str) -> None:
    supervisor = started(make_settings(abi, f"sim:rate=0,prefill_ms=0,tokens=30,lang={lang},split_utf8=1"))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        result, sink = ask(supervisor, "你好 🌍")
        assert "\ufffd" not in result.text
        assert "".join(sink.chunks) == result.text
        assert "你好 🌍" in result.text
        assert any(ord(ch) > 0x2E80 for ch in result.text[result.text.index("🌍") + 1 :])
    finally:
        supervisor.stop()


@pytest.mark.parametrize(
    "runtime", [(abi, "sim:rate=50,prefill_ms=0,tokens=500") for abi in ABIS], indirect=True, ids=ABIS
)
def test_abort_stops_generation_and_keeps_the_text(runtime: RuntimeSupervisor) -> None:
    sink = CollectingSink(signal_at=5)
    cancel = CancelToken()
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = runtime.generate(GenerationRequest(prompt="long", timeout_s=30), sink, cancel)

    worker = threading.Thread(target=run)
    worker.start()
    assert sink.reached.wait(10)  # mid-stream: five tokens in
    cancel.cancel("abort")
    worker.join(10)
    result = outcome["result"]
    assert result.finish_reason == "abort"
    assert result.error_code == "aborted"
    assert result.text == "".join(sink.chunks)
    assert 5 <= result.completion_tokens < 500
    follow_up, _ = ask(runtime, "again", max_new_tokens=3)
    assert follow_up.error_code is None


@pytest.mark.parametrize(
    "runtime", [(abi, "sim:rate=40,prefill_ms=0,tokens=1000") for abi in ABIS], indirect=True, ids=ABIS
)
def test_timeout_aborts_and_reports_timeout(runtime: RuntimeSupervisor) -> None:
    result, sink = ask(runtime, "slow", timeout_s=0.5)
    assert result.finish_reason == "timeout"
    assert result.error_code == "timeout"
    assert result.text and result.text == "".join(sink.chunks)
    assert runtime.status == "ready"


@pytest.mark.parametrize("abi", ABIS)
def test_hang_becomes_runtime_hung_and_the_worker_is_restarted(abi: str) -> None:
    supervisor = started(make_settings(abi, "sim:rate=200,prefill_ms=0,tokens=40,hang_at=20"))
    try:
        assert supervisor.wait_ready(20)
        result, _ = ask(supervisor, "hang please", timeout_s=5)
        assert result.error_code == "runtime_hung"
        assert result.finish_reason == "error"
        assert result.text.startswith("[turn 1]")
        assert supervisor.wait_ready(20), supervisor.last_error
        assert supervisor.restarts == 1
        # hang_at=20 only triggers on a reply of 20+ tokens: a short one is served by the new worker.
        follow_up, _ = ask(supervisor, "short", max_new_tokens=3)
        assert follow_up.error_code is None
        assert follow_up.finish_reason == "length"
    finally:
        supervisor.stop()


@pytest.mark.parametrize("abi", ABIS)
def test_sigsegv_becomes_runtime_crashed_and_the_worker_is_restarted(abi: str) -> None:
    # rate=200: on 1.2 the bridge caps a reply by aborting, so the follow-up must stop well before token 30.
    supervisor = started(make_settings(abi, "sim:rate=200,prefill_ms=0,tokens=40,crash_at=30"))
    try:
        assert supervisor.wait_ready(20)
        result, _ = ask(supervisor, "crash please")
        assert result.error_code == "runtime_crashed"
        assert "SIGSEGV" in (result.error_message or "")
        assert supervisor.wait_ready(20), supervisor.last_error
        assert "SIGSEGV" in (supervisor.last_error or "")
        follow_up, _ = ask(supervisor, "short", max_new_tokens=4)
        assert follow_up.error_code is None
    finally:
        supervisor.stop()


@pytest.mark.parametrize(
    ("runtime_settings", "expected"),
    [
        ({"library": "sim", "abi": "1.3", "model_path": "sim:fail_init=1"}, "rkllm_init failed"),
        ({"library": "sim", "abi": "1.2", "model_path": "/nonexistent/model.rkllm"}, "/nonexistent/model.rkllm"),
        ({"library": "/nonexistent/librkllmrt.so", "model_path": "sim:"}, "/nonexistent/librkllmrt.so"),
    ],
    ids=["init-fails", "missing-model", "bad-library"],
)
def test_init_failures_are_reported_and_requests_get_not_ready(runtime_settings: dict[str, Any], expected: str) -> None:
    settings = Settings(runtime={**runtime_settings, "restart_backoff_s": 5.0})
    supervisor = started(settings)
    try:
        assert supervisor.wait_settled(20) == "failed"
        assert expected in (supervisor.last_error or "")
        assert "Traceback" not in (supervisor.last_error or "")
        with pytest.raises(RequestError) as excinfo:
            ask(supervisor, "anyone?")
        assert excinfo.value.code == "not_ready"
    finally:
        supervisor.stop()


def test_wrong_abi_is_refused_naming_the_setting(tmp_path: Path) -> None:
    fake = tmp_path / "librkllmrt.so"
    fake.write_bytes(b"\x7fELF junk without any version evidence")
    supervisor = started(Settings(runtime={"library": str(fake), "abi": "auto", "model_path": "sim:"}))
    try:
        assert supervisor.wait_settled(20) == "failed"
        assert "runtime.abi" in (supervisor.last_error or "")
    finally:
        supervisor.stop()


@pytest.mark.parametrize("runtime", [(abi, FAST) for abi in ABIS], indirect=True, ids=ABIS)
def test_sessions_continue_and_are_isolated_and_cleared(runtime: RuntimeSupervisor) -> None:
    first, _ = ask(runtime, "one", session="kitchen")
    second, _ = ask(runtime, "two", session="kitchen")
    assert first.text.startswith("[turn 1]")
    assert second.text.startswith("[turn 2]")
    other, _ = ask(runtime, "elsewhere", session="garage")
    assert other.text.startswith("[turn 1]"), "another session must not see the kitchen's history"
    back, _ = ask(runtime, "three", session="kitchen")
    assert back.text.startswith("[turn 1]"), "one KV cache: switching sessions starts the conversation anew"
    again, _ = ask(runtime, "four", session="kitchen")
    assert again.text.startswith("[turn 2]")
    assert runtime.forget("kitchen")
    cleared, _ = ask(runtime, "five", session="kitchen")
    assert cleared.text.startswith("[turn 1]")
    lone, _ = ask(runtime, "no session")
    assert lone.text.startswith("[turn 1]")
    lone_again, _ = ask(runtime, "still none")
    assert lone_again.text.startswith("[turn 1]")


@pytest.mark.parametrize("runtime", [(abi, FAST) for abi in ABIS], indirect=True, ids=ABIS)
def test_system_prompt_per_request(runtime: RuntimeSupervisor) -> None:
    result, _ = ask(runtime, "hi", system="You are a kettle.")
    assert "[system: You are a kettle.]" in result.text
    plain, _ = ask(runtime, "hi")
    assert "[system:" not in plain.text


def test_max_new_tokens_on_1_2_is_enforced_by_the_bridge(trace: Path) -> None:
    supervisor = started(make_settings("1.2", "sim:rate=0,prefill_ms=0,tokens=50"))
    try:
        assert supervisor.wait_ready(20)
        result, sink = ask(supervisor, "count", max_new_tokens=5)
        assert result.finish_reason == "length"
        assert result.error_code is None
        assert len(sink.chunks) == 5
        with pytest.raises(RequestError) as excinfo:
            ask(supervisor, "hot", sampling={"temperature": 0.2})
        assert excinfo.value.code == "unsupported"
    finally:
        supervisor.stop()
    calls = trace.read_text()
    assert "rkllm_run " in calls
    assert "rkllm_run_async" not in calls


def test_per_request_sampling_reaches_the_1_3_runtime(trace: Path) -> None:
    supervisor = started(make_settings("1.3", "sim:rate=0,prefill_ms=0,tokens=50"))
    try:
        assert supervisor.wait_ready(20)
        result, _ = ask(supervisor, "count", max_new_tokens=7, sampling={"temperature": 0.25, "top_k": 7})
        assert result.finish_reason == "length"
        assert result.completion_tokens == 7
    finally:
        supervisor.stop()
    runs = [line for line in trace.read_text().splitlines() if line.startswith("rkllm_run ")]
    assert runs and "max_new_tokens=7" in runs[-1]
    assert "temperature=0.25" in runs[-1] and "top_k=7" in runs[-1]
    assert "rkllm_run_async" not in trace.read_text()


def test_lora_adapters_and_prompt_cache_from_settings_reach_the_runtime(trace: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "style.rkllm"
    adapter.write_bytes(b"lora")
    cache = tmp_path / "prompt-cache.bin"
    cache.write_bytes(b"cache")
    settings = Settings(
        runtime={
            "library": "sim",
            "abi": "1.3",
            "model_path": FAST,
            "lora_adapters": [{"path": str(adapter), "name": "style", "scale": 0.5}],
            "prompt_cache_path": str(cache),
        }
    )
    supervisor = started(settings)
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        assert supervisor.model_info is not None and supervisor.model_info.lora_adapters == ["style"]
        result, _ = ask(supervisor, "styled")
        assert result.error_code is None
    finally:
        supervisor.stop()
    calls = trace.read_text()
    assert f"rkllm_load_lora path={adapter} name=style scale=0.50" in calls
    assert f"rkllm_load_prompt_cache path={cache}" in calls
    runs = [line for line in calls.splitlines() if line.startswith("rkllm_run ")]
    assert runs and "lora=style" in runs[-1]


def test_missing_lora_adapter_is_an_init_failure_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent-lora.rkllm"
    settings = Settings(
        runtime={
            "library": "sim",
            "model_path": FAST,
            "lora_adapters": [{"path": str(missing), "name": "absent"}],
            "restart_backoff_s": 5.0,
        }
    )
    supervisor = started(settings)
    try:
        assert supervisor.wait_settled(20) == "failed"
        assert "rkllm_load_lora" in (supervisor.last_error or "")
        assert str(missing) in (supervisor.last_error or ""), "the message must name the adapter file"
    finally:
        supervisor.stop()


# -- cancel tokens: no cancel before the finish is lost ------------------------------------------------------

# A reply that cannot end by itself while the test runs (10,000 tokens at 200 tok/s): a lost abort would show as
# a run that goes on to "stop", not as a flaky pass.
LONG = "sim:rate=200,prefill_ms=50,tokens=10000"
POINTS = ("before_generate", "concurrent", "in_prefill", "first_token", "mid_stream")


class CancellingSink(CollectingSink):
    """Cancels the token itself, on the run loop's thread, when the first chunk arrives."""

    def __init__(self, cancel: CancelToken) -> None:
        super().__init__()
        self.cancel = cancel

    def text(self, chunk: str) -> None:
        super().text(chunk)
        self.cancel.cancel("abort")


def wait_for_trace(trace: Path, line: str) -> None:
    """Wait until the simulated runtime has traced ``line`` (its own signal of where a run is)."""
    idle = threading.Event()
    while not (trace.exists() and line in trace.read_text().splitlines()):
        idle.wait(0.002)


def cancel_after(wait: Callable[[], object], cancel: CancelToken, reason: CancelReason = "abort") -> threading.Thread:
    """A thread that cancels ``cancel`` with ``reason`` once ``wait()`` returns."""

    def run() -> None:
        wait()
        cancel.cancel(reason)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("abi", ABIS)
def test_no_cancel_before_the_finish_is_lost(abi: str, trace: Path) -> None:
    rng = random.Random(20261130)
    in_prefill_held = 0
    supervisor = started(make_settings(abi, LONG))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        for i in range(80):
            point = POINTS[i % len(POINTS)]
            cancel = CancelToken()
            sink: CollectingSink = CollectingSink(signal_at=rng.randint(2, 6))
            helper: threading.Thread | None = None
            if point == "before_generate":
                cancel.cancel("abort")
            elif point == "concurrent":
                # Races the run command: lands before it is sent, before rkllm_run starts, or in the prefill.
                spins = rng.randint(0, 20000)
                go = threading.Barrier(2)

                def race(spins: int = spins, go: threading.Barrier = go, cancel: CancelToken = cancel) -> None:
                    go.wait()
                    for _ in range(spins):
                        pass
                    cancel.cancel("abort")

                helper = threading.Thread(target=race)
                helper.start()
                go.wait()
            elif point == "in_prefill":
                trace.write_text("")  # no run is in flight: the next "sim_prefill begin" is this run's
                helper = cancel_after(lambda: wait_for_trace(trace, "sim_prefill begin"), cancel)
            elif point == "first_token":
                sink = CancellingSink(cancel)
            else:
                helper = cancel_after(sink.reached.wait, cancel)
            result = supervisor.generate(GenerationRequest(prompt=f"run {i}", timeout_s=120), sink, cancel)
            if helper is not None:
                helper.join(30)
            assert (result.finish_reason, result.error_code) == ("abort", "aborted"), (i, point, result)
            assert result.text == "".join(sink.chunks)
            if point == "in_prefill":
                ends = [line for line in trace.read_text().splitlines() if line.startswith("sim_prefill end")]
                in_prefill_held += bool(ends) and "aborted=1" in ends[0]
        assert in_prefill_held > 0, "premise: at least one cancel must have landed in a prefill"
        # After the finish a cancel changes nothing, and leaves nothing behind for the next run.
        done, _ = ask(supervisor, "short", max_new_tokens=3)
        late = CancelToken()
        finished, sink = ask_with(supervisor, "short again", late, max_new_tokens=3)
        late.cancel("abort")
        assert (done.finish_reason, finished.finish_reason) == ("length", "length")
        after, after_sink = ask(supervisor, "after", max_new_tokens=4)
        assert after.finish_reason == "length" and after.completion_tokens == 4
        assert len(after_sink.chunks) == 4
        assert supervisor.status == "ready" and supervisor.restarts == 0
    finally:
        supervisor.stop()


def ask_with(
    supervisor: RuntimeSupervisor, prompt: str, cancel: CancelToken, **fields: Any
) -> tuple[Any, CollectingSink]:
    sink = CollectingSink()
    fields.setdefault("timeout_s", 20.0)
    return supervisor.generate(GenerationRequest(prompt=prompt, **fields), sink, cancel), sink


@pytest.mark.parametrize("reason", ["shutdown", "disconnect"])
def test_every_cancel_reason_but_timeout_finishes_aborted(reason: CancelReason) -> None:
    supervisor = started(make_settings("1.3", LONG))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        cancel = CancelToken()
        sink = CollectingSink(signal_at=2)
        helper = cancel_after(sink.reached.wait, cancel, reason)
        result = supervisor.generate(GenerationRequest(prompt="x", timeout_s=60), sink, cancel)
        helper.join(30)
        assert (result.finish_reason, result.error_code) == ("abort", "aborted")
        assert cancel.reason == reason
    finally:
        supervisor.stop()


# -- the worker process ------------------------------------------------------------------------------------


def test_the_worker_imports_the_daemons_package_whatever_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source tree in the working directory (a clone, say) must not shadow the package the daemon runs.
    decoy = tmp_path / "rkllm_mqtt"
    (decoy / "runtime").mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the rkllm_mqtt in the working directory was imported')\n")
    (decoy / "runtime" / "__init__.py").write_text("")
    (decoy / "runtime" / "worker.py").write_text("raise SystemExit('the decoy worker ran')\n")
    monkeypatch.chdir(tmp_path)
    supervisor = started(make_settings("1.3", FAST))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        result, _ = ask(supervisor, "hello")
        assert result.finish_reason == "stop"
    finally:
        supervisor.stop()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc/<pid>/environ")
def test_the_worker_gets_only_the_environment_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MQTT_MQTT__PASSWORD", "s3cret-broker-password")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("GITHUB_TOKEN", "s3cret-token")
    monkeypatch.setenv("RKLLM_LOG_LEVEL", "1")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    supervisor = started(make_settings("1.3", FAST))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        pid = supervisor.worker_pid
        assert pid is not None
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        supervisor.stop()
    environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    assert b"s3cret" not in raw
    assert not [name for name in environ if name.startswith(b"RKLLM_MQTT_")]
    assert b"NOTIFY_SOCKET" not in environ
    assert environ[b"RKLLM_LOG_LEVEL"] == b"1"  # what the vendor runtime reads stays
    assert environ[b"LC_ALL"] == b"C.UTF-8"
    assert b"PATH" in environ


# -- a wrong ABI is caught at init --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("abi", "claimed", "layout"),
    [("1.3", "1.2.1", "1.2"), ("1.2", "1.3.0", "1.3"), ("auto", "1.2.3", "1.2")],
    ids=["1.3-set-runtime-says-1.2", "1.2-set-runtime-says-1.3", "auto-runtime-says-1.2"],
)
def test_a_runtime_that_contradicts_the_layout_at_init_is_refused_before_any_run(
    abi: str, claimed: str, layout: str, trace: Path
) -> None:
    supervisor = started(
        Settings(
            runtime={
                "library": "sim",
                "abi": abi,
                "model_path": f"{FAST},claim_version={claimed}",
                "restart_backoff_s": 5.0,
            }
        )
    )
    try:
        assert supervisor.wait_settled(20) == "failed"
        error = supervisor.last_error or ""
        assert f"rkllm-runtime version {claimed}" in error
        assert f'runtime.abi = "{layout}"' in error, "the message names the setting to change"
        assert f'runtime.abi = "{abi}"' in error, "and the setting in use"
        assert "retrying will not help" in error and "next try in 60 s" in error, "no restart loop on it"
        with pytest.raises(RequestError) as excinfo:
            ask(supervisor, "anyone?")
        assert excinfo.value.code == "not_ready"
    finally:
        supervisor.stop()
    calls = [line.split(" ", 1)[0] for line in trace.read_text().splitlines()]
    assert "rkllm_init" in calls
    assert "rkllm_run" not in calls


@pytest.mark.parametrize(("abi", "claimed"), [("1.2", "1.2.1"), ("1.3", "1.3.0")])
def test_a_runtime_that_agrees_with_the_layout_at_init_runs(abi: str, claimed: str) -> None:
    supervisor = started(make_settings(abi, f"{FAST},claim_version={claimed}"))
    try:
        assert supervisor.wait_ready(20), supervisor.last_error
        result, _ = ask(supervisor, "hello")
        assert result.finish_reason == "stop"
    finally:
        supervisor.stop()


class FailingSink(CollectingSink):
    def text(self, chunk: str) -> None:
        super().text(chunk)
        if len(self.chunks) == 3:
            raise RuntimeError("the sink broke")


@pytest.mark.parametrize(
    "runtime", [(abi, "sim:rate=200,prefill_ms=0,tokens=500") for abi in ABIS], indirect=True, ids=ABIS
)
def test_a_failing_sink_ends_the_run_before_the_next_one(runtime: RuntimeSupervisor) -> None:
    with pytest.raises(RuntimeError, match="the sink broke"):
        runtime.generate(GenerationRequest(prompt="first", timeout_s=60, session="s"), FailingSink(), CancelToken())
    result, sink = ask(runtime, "next", max_new_tokens=6)
    assert result.finish_reason == "length"
    assert result.text.startswith("[turn 1] You said: next.")  # nothing of the first run, a cleared cache
    assert "".join(sink.chunks) == result.text
