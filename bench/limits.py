"""Throughput without MQTT: the simulated runtime through the cffi binding in this process, and through the
runtime supervisor (worker process + event pipe). They bound what the bridge could deliver end to end and show
where tokens/s are lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.stats import summary
from bench.sysinfo import children, cpu_ns


def fast_model(tokens: int) -> str:
    return f"sim:rate=0,prefill_ms=0,tokens={tokens}"


@dataclass
class _CountingHandler:
    tokens: int = 0
    finished: bool = False

    def __call__(self, state: int, text: bytes | None, perf: Any) -> None:
        if state == 0:  # RKLLM_RUN_NORMAL
            self.tokens += 1
        elif state == 2:  # RKLLM_RUN_FINISH
            self.finished = True


@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """The simulated runtime logs to C's stdout like the real one; keep it out of the bench's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def binding_rate(tokens: int, runs: int) -> dict[str, Any]:
    """Tokens/s of ``rkllm_run`` with a handler that only counts: the runtime side's ceiling."""
    with _quiet_c_stdout():
        return _binding_rate(tokens, runs)


def _binding_rate(tokens: int, runs: int) -> dict[str, Any]:
    from rkllm_mqtt.runtime.abi import sim_library_path
    from rkllm_mqtt.runtime.binding import InitParams, RkllmBinding

    binding = RkllmBinding(str(sim_library_path("1.3")), "1.3")
    binding.open()
    handler = _CountingHandler()
    binding.init(InitParams(model_path=fast_model(tokens), max_new_tokens=tokens), handler)
    rates: list[float] = []
    try:
        binding.run("warm up", keep_history=False, max_new_tokens=1000)
        for _ in range(runs):
            handler.tokens = 0
            handler.finished = False
            started = time.perf_counter()
            binding.run("bench", keep_history=False)
            elapsed = time.perf_counter() - started
            if not handler.finished or handler.tokens != tokens:
                raise RuntimeError(f"the binding delivered {handler.tokens} of {tokens} tokens")
            rates.append(tokens / elapsed)
    finally:
        binding.destroy()
    return {"tokens": tokens, "runs": [round(r) for r in rates], "tokens_per_s": round(max(rates))}


class _CountingSink:
    def __init__(self) -> None:
        self.chunks = 0

    def text(self, chunk: str) -> None:
        self.chunks += 1

    def flush_deadline(self) -> float | None:
        return None

    def flush(self) -> None:
        return None


class _StampSink:
    """Records, for each ``stamp=1`` token, how long after the runtime's callback it reached the sink."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []

    def text(self, chunk: str) -> None:
        now = time.monotonic_ns()
        self.latencies_ms.extend((now - int(stamp)) / 1e6 for stamp in chunk.split())

    def flush_deadline(self) -> float | None:
        return None

    def flush(self) -> None:
        return None


def supervisor_latency(tokens: int, rate: float, warmup: int = 5) -> dict[str, Any]:
    """Callback (stamp) to the supervisor's sink, at a moderate rate: the part of the token latency spent before
    the bridge publishes (worker callback, event pipe, the run loop, UTF-8 decoding)."""
    from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest
    from rkllm_mqtt.logs import configure_logging
    from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
    from rkllm_mqtt.settings import Settings

    configure_logging("warning", "json")
    model = f"sim:rate={rate:g},prefill_ms=0,stamp=1,tokens={tokens}"
    supervisor = RuntimeSupervisor(Settings(runtime={"library": "sim", "model_path": model, "max_new_tokens": tokens}))
    supervisor.start()
    try:
        if not supervisor.wait_ready(30.0):
            raise RuntimeError(f"the runtime did not become ready: {supervisor.last_error}")
        sink = _StampSink()
        supervisor.generate(GenerationRequest(prompt="latency", timeout_s=tokens / rate * 2 + 30), sink, CancelToken())
    finally:
        supervisor.stop()
    return {"tokens": tokens, "rate": rate, "latency_ms": summary(sink.latencies_ms[warmup:])}


def supervisor_rate(tokens: int, runs: int) -> dict[str, Any]:
    """Tokens/s through RuntimeSupervisor.generate (worker process, event pipe, decoding) into a counting sink."""
    from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest
    from rkllm_mqtt.logs import configure_logging
    from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
    from rkllm_mqtt.settings import Settings

    configure_logging("warning", "json")
    settings = Settings(runtime={"library": "sim", "model_path": fast_model(tokens), "max_new_tokens": tokens})
    supervisor = RuntimeSupervisor(settings)
    supervisor.start()
    rates: list[float] = []
    cpu_per_token: list[float] = []
    try:
        if not supervisor.wait_ready(30.0):
            raise RuntimeError(f"the runtime did not become ready: {supervisor.last_error}")
        supervisor.generate(
            GenerationRequest(prompt="warm up", timeout_s=60.0, max_new_tokens=1000), _CountingSink(), CancelToken()
        )
        for _ in range(runs):
            sink = _CountingSink()
            worker = next(iter(children(os.getpid())), None)  # the worker process, for its CPU time
            cpu_before = cpu_ns(worker) if worker else 0
            started = time.perf_counter()
            self_before = time.process_time_ns()
            result = supervisor.generate(GenerationRequest(prompt="bench", timeout_s=300.0), sink, CancelToken())
            elapsed = time.perf_counter() - started
            used = time.process_time_ns() - self_before + ((cpu_ns(worker) - cpu_before) if worker else 0)
            if result.error_code is not None or result.completion_tokens != tokens:
                raise RuntimeError(f"supervisor run: {result.error_code} {result.completion_tokens}/{tokens} tokens")
            rates.append(tokens / elapsed)
            cpu_per_token.append(used / tokens / 1000.0)
    finally:
        supervisor.stop()
    return {
        "tokens": tokens,
        "runs": [round(r) for r in rates],
        "tokens_per_s": round(max(rates)),
        "cpu_us_per_token": round(min(cpu_per_token), 2),
    }
