"""The cffi binding against the simulated runtime, on both ABI layouts, through the real callback path.

Everything runs in-process, except the hang and crash faults, which run in a child process.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rkllm_mqtt.errors import AbiError, RequestError, RuntimeCallError, RuntimeLoadError
from rkllm_mqtt.runtime.abi import sim_library_path
from rkllm_mqtt.runtime.binding import (
    STATE_ERROR,
    STATE_FINISH,
    STATE_NORMAL,
    STATE_WAITING,
    InitParams,
    PerfStats,
    RkllmBinding,
    Sampling,
)
from rkllm_mqtt.runtime.protocol import EventKind
from rkllm_mqtt.runtime.relay import Relay

FAST = "rate=0,prefill_ms=0"


@dataclass
class Collector:
    """A result handler that records every callback, as the worker would hand them on."""

    events: list[tuple[int, bytes | None, PerfStats | None]] = field(default_factory=list)
    first_token: threading.Event = field(default_factory=threading.Event)

    def __call__(self, state: int, text: bytes | None, perf: PerfStats | None) -> None:
        self.events.append((state, text, perf))
        if state == STATE_NORMAL:
            self.first_token.set()

    def chunks(self) -> list[bytes]:
        return [t for s, t, _ in self.events if s in (STATE_NORMAL, STATE_WAITING) and t is not None]

    def text(self) -> str:
        # Incremental decoding, as the bridge must: a character may be split across callbacks.
        decoder = codecs.getincrementaldecoder("utf-8")()
        out = "".join(decoder.decode(chunk) for chunk in self.chunks())
        return out + decoder.decode(b"", final=True)

    def states(self) -> list[int]:
        return [s for s, _, _ in self.events]

    def clear(self) -> None:
        self.events.clear()
        self.first_token.clear()


@pytest.fixture(params=["1.2", "1.3"])
def abi(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "sim-trace.log"
    monkeypatch.setenv("RKLLM_SIM_TRACE", str(path))
    return path


@pytest.fixture
def binding(abi: str, trace: Path) -> Iterator[RkllmBinding]:
    b = RkllmBinding(str(sim_library_path(abi)), abi)
    b.open()
    yield b
    b.destroy()
    # Whatever a test did, the one function that hangs in 1.2.1 was never reached.
    assert "rkllm_run_async" not in (trace.read_text() if trace.exists() else "")


def loaded(binding: RkllmBinding, spec: str, **params: object) -> Collector:
    collector = Collector()
    binding.init(InitParams(model_path=f"sim:{spec}", **params), collector)  # type: ignore[arg-type]
    return collector


def trace_lines(trace: Path, function: str) -> list[str]:
    return [line for line in trace.read_text().splitlines() if line.split(" ", 1)[0] == function]


def test_streamed_reply_joins_to_the_text_and_ends_with_finish(binding: RkllmBinding) -> None:
    out = loaded(binding, f"tokens=10,{FAST}")
    binding.run("hello world", keep_history=False)
    expected = "[turn 1] You said: hello world. robots count tokens under "
    assert out.text() == expected
    # One callback per token: words with their trailing space.
    assert out.chunks()[:6] == [b"[turn ", b"1] ", b"You ", b"said: ", b"hello ", b"world. "]
    assert out.states() == [STATE_NORMAL] * 10 + [STATE_FINISH]
    _state, text, perf = out.events[-1]
    assert text is None
    assert perf is not None
    assert (perf.prefill_tokens, perf.generate_tokens) == (2, 10)
    assert perf.memory_usage_mb > 0
    assert all(p is None for _, _, p in out.events[:-1])


def test_prefill_and_rate_are_simulated(binding: RkllmBinding) -> None:
    out = loaded(binding, "tokens=5,rate=100,prefill_ms=60")
    start = time.monotonic()
    binding.run("hi", keep_history=False)
    elapsed = time.monotonic() - start
    perf = out.events[-1][2]
    assert perf is not None
    assert perf.prefill_time_ms >= 55
    assert perf.generate_time_ms >= 35  # four 10 ms gaps between five tokens
    assert elapsed >= 0.095


@pytest.mark.parametrize("lang", ["zh", "emoji", "mixed"])
def test_split_utf8_decodes_intact(binding: RkllmBinding, lang: str) -> None:
    out = loaded(binding, f"tokens=30,{FAST},lang={lang},split_utf8=1")
    binding.run("说 hi 🙂", keep_history=False)
    split_text = out.text()
    binding.destroy()

    whole = loaded(binding, f"tokens=30,{FAST},lang={lang}")
    binding.run("说 hi 🙂", keep_history=False)
    assert split_text == whole.text()
    assert "You said: 说 hi 🙂. " in split_text
    assert any(ord(c) > 0x7F for c in split_text.split("🙂. ", 1)[1])
    # The split really happened: some chunks are not valid UTF-8 alone, and both delivery states were used.
    undecodable = 0
    for chunk in out.chunks():
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable >= 4
    assert STATE_WAITING in out.states()
    assert out.states()[-1] == STATE_FINISH


def test_abort_from_another_thread_stops_generation(binding: RkllmBinding) -> None:
    out = loaded(binding, "tokens=100000,rate=500,prefill_ms=0")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            binding.run("go", keep_history=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert out.first_token.wait(5)
    binding.abort()
    thread.join(5)
    assert not thread.is_alive()
    assert errors == []
    states = out.states()
    assert states[-1] == STATE_FINISH
    assert 0 < states.count(STATE_NORMAL) < 1000
    perf = out.events[-1][2]
    assert perf is not None
    assert perf.generate_tokens == states.count(STATE_NORMAL)


def wait_for_trace(trace: Path, line: str, timeout: float = 60.0) -> None:
    """Wait until the simulated runtime has written ``line`` to its trace (its own signal of where it is)."""
    deadline = time.monotonic() + timeout
    while not (trace.exists() and line in trace.read_text().splitlines()):
        assert time.monotonic() < deadline, f"the runtime never traced {line!r}"
        time.sleep(0.005)


def test_abort_during_prefill_takes_effect_after_it(binding: RkllmBinding, trace: Path) -> None:
    # A prefill long enough for the abort to land inside it on a slow machine too; the trace tells when the
    # prefill began, and at its end whether the abort had arrived by then (the premise of this test).
    out = loaded(binding, "tokens=50,rate=0,prefill_ms=1500")
    thread = threading.Thread(target=binding.run, args=("go",), kwargs={"keep_history": False})
    thread.start()
    wait_for_trace(trace, "sim_prefill begin")
    binding.abort()
    thread.join(60)
    assert not thread.is_alive()
    (end,) = trace_lines(trace, "sim_prefill")[1:]
    assert "aborted=1" in end, "premise: the abort arrived during the prefill"
    assert int(end.rsplit("elapsed_ms=", 1)[1]) >= 1500  # prefill is not interruptible
    assert out.states() == [STATE_FINISH]  # and no token came after it


def test_abort_without_a_run_is_harmless(binding: RkllmBinding) -> None:
    binding.abort()  # no handle yet: nothing to do
    out = loaded(binding, f"tokens=3,{FAST}")
    binding.abort()  # idle: forgotten when the next run starts
    binding.run("x", keep_history=False)
    assert out.states() == [STATE_NORMAL] * 3 + [STATE_FINISH]


def test_error_at_gives_error_state_and_a_call_error(binding: RkllmBinding) -> None:
    out = loaded(binding, f"tokens=10,{FAST},error_at=3")
    with pytest.raises(RuntimeCallError) as info:
        binding.run("x", keep_history=False)
    assert info.value.function == "rkllm_run"
    assert info.value.ret == -1
    assert info.value.code == "runtime_error"
    assert out.states() == [STATE_NORMAL, STATE_NORMAL, STATE_ERROR]
    assert out.events[-1][1] is None


def test_fail_init_is_an_init_error(binding: RkllmBinding, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeCallError) as info:
        loaded(binding, "fail_init=1")
    assert info.value.function == "rkllm_init"
    assert "E rkllm: simulated init failure" in capfd.readouterr().err
    # Nothing half-initialised: a good model loads afterwards.
    out = loaded(binding, f"tokens=2,{FAST}")
    binding.run("x", keep_history=False)
    assert out.states()[-1] == STATE_FINISH


def test_missing_model_file_is_an_init_error(
    binding: RkllmBinding, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "model.rkllm"
    with pytest.raises(RuntimeCallError) as info:
        binding.init(InitParams(model_path=str(missing)), Collector())
    assert info.value.function == "rkllm_init"
    assert str(missing) in str(info.value)
    assert f"E rkllm: failed to open model file {missing}" in capfd.readouterr().err


def test_unknown_spec_key_is_an_init_error(binding: RkllmBinding, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeCallError, match="rkllm_init"):
        loaded(binding, "tokens=3,colour=blue")
    assert 'unknown key "colour"' in capfd.readouterr().err


def test_model_file_with_spec_and_without(binding: RkllmBinding, tmp_path: Path) -> None:
    with_spec = tmp_path / "tiny.rkllm"
    with_spec.write_text(f"sim:tokens=4,{FAST}\nrest is ignored\n")
    out = Collector()
    binding.init(InitParams(model_path=str(with_spec)), out)
    binding.run("x", keep_history=False)
    assert out.states() == [STATE_NORMAL] * 4 + [STATE_FINISH]
    binding.destroy()

    plain = tmp_path / "plain.rkllm"
    plain.write_bytes(b"\x00RKLLM binary model")
    out = Collector()
    # The default spec (24 tokens); the init-time max_new_tokens cuts it.
    binding.init(InitParams(model_path=str(plain), max_new_tokens=3), out)
    binding.run("x", keep_history=False)
    assert out.states() == [STATE_NORMAL] * 3 + [STATE_FINISH]


def test_bad_library_path_is_a_load_error(abi: str, tmp_path: Path) -> None:
    path = tmp_path / "librkllmrt.so"
    path.write_bytes(b"not an ELF file")
    for candidate in (path, tmp_path / "missing.so"):
        b = RkllmBinding(str(candidate), abi)
        with pytest.raises(RuntimeLoadError, match=re.escape(str(candidate))):
            b.open()


def test_unknown_abi_is_refused_at_open() -> None:
    b = RkllmBinding(str(sim_library_path("1.3")), "1.4")  # the constructor only assigns
    with pytest.raises(AbiError, match=r"1\.4"):
        b.open()


def test_calls_before_init_are_not_ready(binding: RkllmBinding) -> None:
    with pytest.raises(RuntimeLoadError, match="init"):
        binding.run("x", keep_history=False)
    with pytest.raises(RuntimeLoadError, match="init"):
        binding.clear_kv_cache()
    binding.destroy()  # no handle: nothing to do


def test_init_twice_needs_destroy(binding: RkllmBinding) -> None:
    loaded(binding, f"tokens=2,{FAST}")
    with pytest.raises(RuntimeLoadError, match="destroy"):
        loaded(binding, f"tokens=2,{FAST}")


def test_keep_history_turns_and_clear_kv_cache(binding: RkllmBinding) -> None:
    out = loaded(binding, f"tokens=3,{FAST}")

    def reply(keep: bool) -> str:
        out.clear()
        binding.run("x", keep_history=keep)
        return out.text()

    assert reply(True).startswith("[turn 1] ")
    assert reply(True).startswith("[turn 2] ")
    assert reply(True).startswith("[turn 3] ")
    binding.clear_kv_cache()
    assert reply(True).startswith("[turn 1] ")
    assert reply(False).startswith("[turn 2] ")
    # keep_history=0 drops the conversation after the run.
    assert reply(True).startswith("[turn 1] ")
    binding.clear_kv_cache(keep_system_prompt=True)
    assert reply(False).startswith("[turn 1] ")


def test_chat_template_system_prompt_shows_in_the_reply(binding: RkllmBinding, trace: Path) -> None:
    out = loaded(binding, f"tokens=12,{FAST}")
    binding.set_chat_template("You are terse.", "<|user|>", "<|assistant|>")
    binding.run("hi", keep_history=False)
    assert out.text().startswith("[turn 1] [system: You are terse.] You said: hi. ")
    line = trace_lines(trace, "rkllm_set_chat_template")[-1]
    assert "prompt_prefix=<|user|> prompt_postfix=<|assistant|>" in line


def test_init_params_reach_c(binding: RkllmBinding, trace: Path) -> None:
    loaded(
        binding,
        FAST,
        max_context_len=2048,
        max_new_tokens=77,
        top_k=9,
        top_p=0.5,
        temperature=0.3,
        repeat_penalty=1.2,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        skip_special_token=True,
        enabled_cpus_mask=0xF0,
        embed_flash=True,
    )
    line = trace_lines(trace, "rkllm_init")[-1]
    for part in (
        f"model_path=sim:{FAST}",
        "max_context_len=2048",
        "max_new_tokens=77",
        "top_k=9",
        "top_p=0.50",
        "temperature=0.30",
        "repeat_penalty=1.20",
        "frequency_penalty=0.10",
        "presence_penalty=0.20",
        "skip_special_token=1",
        "enabled_cpus_num=4",
        "enabled_cpus_mask=0xf0",
        "embed_flash=1",
        "n_batch=1",
    ):
        assert part in line.split(), f"{part} not in {line}"


def test_defaults_are_kept_when_params_are_none(binding: RkllmBinding, trace: Path) -> None:
    loaded(binding, FAST)
    line = trace_lines(trace, "rkllm_init")[-1]
    for part in ("max_context_len=512", "max_new_tokens=-1", "top_k=40", "top_p=0.90", "enabled_cpus_num=0"):
        assert part in line.split()


@pytest.mark.parametrize("abi", ["1.3"])
def test_per_request_settings_on_1_3_reach_c(binding: RkllmBinding, trace: Path) -> None:
    out = loaded(binding, f"tokens=20,{FAST}", top_p=0.5, max_new_tokens=12)
    binding.run("x", keep_history=True, max_new_tokens=5, sampling=Sampling(top_k=7, temperature=0.25))
    assert out.states() == [STATE_NORMAL] * 5 + [STATE_FINISH]
    line = trace_lines(trace, "rkllm_run")[-1].split()
    # Given fields override, the others start from the init-time values.
    for part in (
        "keep_history=1",
        "max_new_tokens=5",
        "top_k=7",
        "top_p=0.50",
        "temperature=0.25",
        "sampling=run",
    ):
        assert part in line

    out.clear()
    binding.run("x", keep_history=False)
    assert out.states() == [STATE_NORMAL] * 12 + [STATE_FINISH]
    line = trace_lines(trace, "rkllm_run")[-1].split()
    for part in ("keep_history=0", "max_new_tokens=12", "top_k=40", "temperature=0.80", "sampling=init"):
        assert part in line


@pytest.mark.parametrize("abi", ["1.2"])
def test_per_request_settings_on_1_2_are_refused(binding: RkllmBinding, trace: Path) -> None:
    loaded(binding, f"tokens=3,{FAST}")
    with pytest.raises(RequestError, match=r"1\.3") as info:
        binding.run("x", keep_history=False, sampling=Sampling(temperature=0.1))
    assert info.value.code == "unsupported"
    with pytest.raises(RequestError, match=r"1\.3"):
        binding.run("x", keep_history=False, max_new_tokens=2)
    assert trace_lines(trace, "rkllm_run") == []  # refused before C
    binding.run("x", keep_history=False, sampling=Sampling())  # nothing asked for: nothing to refuse
    assert len(trace_lines(trace, "rkllm_run")) == 1


def test_trace_records_the_session_and_never_run_async(binding: RkllmBinding, trace: Path) -> None:
    loaded(binding, f"tokens=2,{FAST}")
    binding.run("x", keep_history=True)
    binding.abort()
    binding.clear_kv_cache()
    binding.destroy()
    functions = [line.split(" ", 1)[0] for line in trace.read_text().splitlines()]
    assert [f for f in functions if f.startswith("rkllm_")] == [
        "rkllm_createDefaultParam",
        "rkllm_init",
        "rkllm_run",
        "rkllm_abort",
        "rkllm_clear_kv_cache",
        "rkllm_destroy",
    ]
    assert "start_pos=NULL end_pos=NULL" in trace_lines(trace, "rkllm_clear_kv_cache")[0]


def test_a_raising_handler_does_not_break_the_run(binding: RkllmBinding) -> None:
    seen: list[int] = []

    def handler(state: int, text: bytes | None, perf: PerfStats | None) -> None:
        seen.append(state)
        raise RuntimeError("handler bug")

    binding.init(InitParams(model_path=f"sim:tokens=6,{FAST}"), handler)
    binding.run("x", keep_history=False)
    # Every token still came (a non-zero return would have paused generation), then FINISH.
    assert seen == [STATE_NORMAL] * 6 + [STATE_FINISH]
    assert isinstance(binding.last_handler_error, RuntimeError)
    binding.run("x", keep_history=False)
    assert len(seen) == 14


def test_a_second_concurrent_run_is_refused_by_the_runtime(binding: RkllmBinding) -> None:
    out = loaded(binding, "tokens=100000,rate=500,prefill_ms=0")
    thread = threading.Thread(target=binding.run, args=("x",), kwargs={"keep_history": False})
    thread.start()
    try:
        assert out.first_token.wait(5)
        with pytest.raises(RuntimeCallError, match="rkllm_run"):
            binding.run("y", keep_history=False)
    finally:
        binding.abort()
        thread.join(5)
    assert not thread.is_alive()


def test_destroy_during_a_run_is_refused_and_can_be_retried(binding: RkllmBinding) -> None:
    out = loaded(binding, "tokens=100000,rate=500,prefill_ms=0")
    thread = threading.Thread(target=binding.run, args=("x",), kwargs={"keep_history": False})
    thread.start()
    try:
        assert out.first_token.wait(5)
        with pytest.raises(RuntimeCallError, match="rkllm_destroy"):
            binding.destroy()
    finally:
        binding.abort()  # the handle survived the refused destroy, so abort still reaches the run
        thread.join(5)
    assert not thread.is_alive()
    assert out.states()[-1] == STATE_FINISH
    binding.destroy()
    with pytest.raises(RuntimeLoadError, match="init"):
        binding.run("x", keep_history=False)


def test_invalid_role_is_refused_by_the_runtime(binding: RkllmBinding, capfd: pytest.CaptureFixture[str]) -> None:
    loaded(binding, f"tokens=2,{FAST}")
    with pytest.raises(RuntimeCallError, match="rkllm_run"):
        binding.run("x", keep_history=False, role="narrator")
    assert 'role must be "user" or "tool"' in capfd.readouterr().err
    binding.run("x", keep_history=False, role="tool")


def test_lora_and_prompt_cache(binding: RkllmBinding, tmp_path: Path, trace: Path) -> None:
    out = loaded(binding, f"tokens=2,{FAST}")
    binding.load_lora("sim:adapter", "style", 0.5)
    assert "path=sim:adapter name=style scale=0.50" in trace_lines(trace, "rkllm_load_lora")[0]
    with pytest.raises(RuntimeCallError, match="rkllm_load_lora"):
        binding.load_lora(str(tmp_path / "missing.rkllm"), "other", 1.0)
    binding.run("x", keep_history=False, lora_name="style")
    assert out.states()[-1] == STATE_FINISH
    with pytest.raises(RuntimeCallError, match="rkllm_run"):
        binding.run("x", keep_history=False, lora_name="not-loaded")

    cache = tmp_path / "prompt.cache"
    binding.run("x", keep_history=False, prompt_cache_path=str(cache), save_prompt_cache=True)
    assert cache.is_file()
    binding.load_prompt_cache(str(cache))
    with pytest.raises(RuntimeCallError, match="rkllm_load_prompt_cache"):
        binding.load_prompt_cache(str(tmp_path / "no.cache"))


def test_stamp_tokens_are_monotonic_nanoseconds(binding: RkllmBinding) -> None:
    out = loaded(binding, "tokens=5,rate=1000,prefill_ms=0,stamp=1")
    before = time.monotonic_ns()
    binding.run("x", keep_history=False)
    after = time.monotonic_ns()
    stamps = [int(chunk.decode().rstrip(" ")) for chunk in out.chunks()]
    assert len(stamps) == 5
    assert all(chunk.endswith(b" ") for chunk in out.chunks())
    assert before <= stamps[0] <= stamps[-1] <= after
    assert stamps == sorted(stamps)


def test_nul_in_prompt_is_refused(binding: RkllmBinding) -> None:
    loaded(binding, f"tokens=2,{FAST}")
    with pytest.raises(ValueError, match="NUL"):
        binding.run("a\x00b", keep_history=False)


# -- faults that end the process: run in a child --

CHILD = textwrap.dedent(
    """
    import os, sys, threading
    from rkllm_mqtt.runtime.abi import sim_library_path
    from rkllm_mqtt.runtime.binding import InitParams, RkllmBinding

    abi, spec, abort_when_hung = sys.argv[1], sys.argv[2], sys.argv[3] == "abort"
    b = RkllmBinding(str(sim_library_path(abi)), abi)
    b.open()

    def abort_when_the_runtime_says_it_hangs(read_fd):
        # The runtime's stderr comes here: its "simulated hang" line is the signal that rkllm_run is stuck.
        for line in os.fdopen(read_fd, errors="replace"):
            if "simulated hang" in line:
                b.abort()
                print("aborted", flush=True)

    if abort_when_hung:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        threading.Thread(target=abort_when_the_runtime_says_it_hangs, args=(read_fd,), daemon=True).start()

    def on_result(state, text, perf):
        print("state", state, flush=True)

    b.init(InitParams(model_path="sim:" + spec), on_result)
    b.run("x", keep_history=False)
    print("returned", flush=True)
    """
)


def start_child(abi: str, spec: str, abort: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, abi, spec, "abort" if abort else "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_crash_at_kills_the_process_with_sigsegv(abi: str) -> None:
    proc = start_child(abi, f"tokens=10,{FAST},crash_at=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -11
    assert out.count("state 0") == 2
    assert "returned" not in out


def test_hang_at_blocks_forever_even_after_abort(abi: str) -> None:
    proc = start_child(abi, f"tokens=10,{FAST},hang_at=2", abort=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # up to the abort, made once the runtime said it hangs
            lines.append(line.strip())
            if line.strip() == "aborted":
                break
        assert lines.count("state 0") == 1
        assert "aborted" in lines
        # The abort was made; rkllm_run must not return. A slower machine only makes a return less likely.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.0)
    finally:
        proc.kill()
        rest, _ = proc.communicate()
    assert "returned" not in rest


# -- the C token relay the worker uses --


def read_frames(fd: int) -> list[tuple[int, bytes]]:
    """Every frame waiting in the pipe (non-blocking)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    frames = []
    while data:
        kind, length = struct.unpack("!BI", data[:5])
        frames.append((kind, data[5 : 5 + length]))
        data = data[5 + length :]
    return frames


@pytest.fixture
def relay_pipe() -> Iterator[tuple[Relay, int]]:
    read_fd, write_fd = os.pipe()
    relay = Relay.load(write_fd)
    assert relay is not None, "the package's install builds the relay next to the simulated runtime"
    yield relay, read_fd
    os.close(read_fd)
    os.close(write_fd)


def test_the_relay_writes_token_frames_and_hands_on_the_rest(
    binding: RkllmBinding, relay_pipe: tuple[Relay, int]
) -> None:
    relay, read_fd = relay_pipe
    out = Collector()
    binding.init(InitParams(model_path=f"sim:tokens=30,{FAST},lang=mixed,split_utf8=1"), out, relay=relay)
    relay.begin_run(0)
    binding.run("你好", keep_history=False)
    frames = read_frames(read_fd)
    assert {kind for kind, _ in frames} == {EventKind.CHUNK}
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = "".join(decoder.decode(payload) for _, payload in frames) + decoder.decode(b"", final=True)
    assert text.startswith("[turn 1] You said: 你好. ")
    assert "\ufffd" not in text  # characters split across callbacks arrive whole
    assert out.states() == [STATE_FINISH]  # only what is not token text reaches Python
    perf = out.events[-1][2]
    assert perf is not None and perf.generate_tokens == 30


def test_the_relay_enforces_a_token_cap_once(binding: RkllmBinding, relay_pipe: tuple[Relay, int]) -> None:
    relay, read_fd = relay_pipe
    binding.init(InitParams(model_path=f"sim:tokens=20,{FAST}"), Collector(), relay=relay)
    relay.begin_run(5)
    binding.run("x", keep_history=False)
    kinds = [kind for kind, _ in read_frames(read_fd)]
    assert kinds == [EventKind.CHUNK] * 5 + [EventKind.CAP_REACHED]
    assert relay.tokens() == 5
    relay.begin_run(0)  # the next run starts afresh
    binding.run("y", keep_history=False)
    assert [kind for kind, _ in read_frames(read_fd)] == [EventKind.CHUNK] * 20
