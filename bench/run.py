"""rkllm-mqtt benchmark: ``python -m bench [--quick]`` or ``python bench/run.py [--quick]`` from the repo root.

Starts a private Mosquitto on a free loopback port and, one after another, daemons on the simulated runtime;
measures token latency, throughput, CPU per token, idle CPU, memory, start-up, crash recovery and a burst of
requests; prints a table with the targets and writes everything to ``bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

if not __package__:  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import limits, measure, report
from bench.measure import Env, running_daemon
from bench.mqttc import Client
from bench.procs import Mosquitto
from bench.sysinfo import git_revision, loadavg, machine, machine_cpu, machine_cpu_use, speed_gauge_ms

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("limits", "latency", "cpu", "first_chunk", "throughput", "recovery", "burst")


@dataclass(frozen=True)
class Plan:
    mode: str
    binding_tokens: int
    supervisor_tokens: int
    limit_runs: int
    latency_tokens: int
    latency_rate: float
    supervisor_latency_tokens: int
    cpu_requests: int
    cpu_tokens: int
    cpu_rate: float
    first_chunk_pairs: int
    idle_s: float
    throughput_tokens: int
    throughput_runs: int
    long_reply_tokens: int
    coalesce_ms: int
    crash_trials: int
    crash_at: int
    burst_requests: int
    burst_queue_sizes: tuple[int, ...]


QUICK = Plan(
    mode="quick",
    binding_tokens=200_000,
    supervisor_tokens=20_000,
    limit_runs=2,
    latency_tokens=250,
    latency_rate=50,
    supervisor_latency_tokens=250,
    cpu_requests=1,
    cpu_tokens=200,
    cpu_rate=20,
    first_chunk_pairs=10,
    idle_s=10,
    throughput_tokens=20_000,
    throughput_runs=2,
    long_reply_tokens=100_000,  # past 65,535 messages, as little past as reliably shows it
    coalesce_ms=50,
    crash_trials=2,
    crash_at=10,
    burst_requests=1000,
    burst_queue_sizes=(8, 1000),
)

FULL = Plan(
    mode="full",
    binding_tokens=500_000,
    supervisor_tokens=50_000,  # as many as each end-to-end throughput run
    limit_runs=3,
    latency_tokens=1500,
    latency_rate=50,
    supervisor_latency_tokens=500,
    cpu_requests=3,
    cpu_tokens=200,
    cpu_rate=20,
    first_chunk_pairs=20,
    idle_s=30,
    throughput_tokens=50_000,  # below 65,535 (MQTT message ids): see the long reply
    throughput_runs=3,
    long_reply_tokens=120_000,
    coalesce_ms=50,
    crash_trials=5,
    crash_at=10,
    burst_requests=1000,
    burst_queue_sizes=(8, 1000),
)


class TerminatedError(Exception):
    """SIGTERM: unwind like Ctrl-C so that everything started is stopped."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise TerminatedError("terminated")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Runner:
    """Runs the scenarios, keeping each one's result or its error."""

    def __init__(self, plan: Plan, only: set[str], broker_nodelay: bool = False) -> None:
        self.plan = plan
        self.only = only
        self.broker_nodelay = broker_nodelay
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def wanted(self, scenario: str) -> bool:
        return scenario in self.only

    def step(self, name: str, func: Callable[[], Any]) -> Any:
        say(f"{name} ...")
        started = time.monotonic()
        try:
            value = func()
        except (KeyboardInterrupt, TerminatedError):
            raise
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            say(f"{name} FAILED: {exc}")
            traceback.print_exc(file=sys.stderr)
            return None
        if value is not None:
            self.results[name] = value
        say(f"{name} done in {time.monotonic() - started:.1f} s")
        return value

    def run(self, workdir: Path) -> None:
        p = self.plan
        if self.wanted("limits"):
            self.step("binding", lambda: limits.binding_rate(p.binding_tokens, p.limit_runs))
            self.step("supervisor", lambda: limits.supervisor_rate(p.supervisor_tokens, p.limit_runs))
            self.step(
                "supervisor_latency", lambda: limits.supervisor_latency(p.supervisor_latency_tokens, p.latency_rate)
            )
        if not self.only - {"limits"}:
            return
        with Mosquitto(workdir, tcp_nodelay=self.broker_nodelay) as broker:
            say(f"mosquitto on port {broker.port} (pid {broker.pid})")
            sub = Client(broker.port, "bench-sub").start()
            pub = Client(broker.port, "bench-pub").start()
            env = Env(workdir, broker.port, broker.pid, sub, pub)
            try:
                self._mqtt_scenarios(env)
            finally:
                sub.stop()
                pub.stop()
                self.results["startup"] = env.startups
                self.results["daemons"] = env.daemons

    def _mqtt_scenarios(self, env: Env) -> None:
        p = self.plan
        if self.wanted("latency"):
            self.step("latency_daemon", lambda: self._latency(env))
        if self.wanted("cpu"):
            model = f"sim:rate={p.cpu_rate:g},prefill_ms=0,tokens={p.cpu_tokens}"
            self.step("cpu_daemon", lambda: self._with(env, "cpu", model, {}, self._cpu))
        if self.wanted("first_chunk"):
            model = f"sim:rate={p.cpu_rate:g},prefill_ms=0,tokens=200"
            self.step("first_chunk_daemon", lambda: self._with(env, "first_chunk", model, {}, self._first_chunk))
        if self.wanted("throughput") or self.wanted("burst"):
            # The burst runs once per queue size: the first on the stream daemon, a second on the coalesced one.
            first, second = p.burst_queue_sizes[0], p.burst_queue_sizes[-1]
            self.step("stream_daemon", lambda: self._throughput(env, 0, "throughput_stream", first, first))
            bursts = second if len(p.burst_queue_sizes) > 1 else None
            self.step(
                "coalesced_daemon",
                lambda: self._throughput(env, p.coalesce_ms, "throughput_coalesced", second, bursts),
            )
        if self.wanted("recovery"):
            model = f"sim:rate=0,prefill_ms=0,tokens={p.crash_at * 2},crash_at={p.crash_at}"
            self.step("recovery_daemon", lambda: self._with(env, "crash", model, {}, self._recovery))

    def _with(self, env: Env, label: str, model: str, limits_: dict[str, Any], body: Callable[..., None]) -> bool:
        with running_daemon(env, label, model, limits=limits_) as daemon:
            say(f"{label} daemon pid {daemon.pid}")
            body(env, daemon)
        return True

    def _latency(self, env: Env) -> bool:
        p = self.plan
        model = f"sim:rate={p.latency_rate:g},prefill_ms=0,stamp=1,tokens={p.latency_tokens}"

        def body(env: Env, daemon: Any) -> None:
            self.step("latency", lambda: measure.token_latency(env, daemon, p.latency_tokens, p.latency_rate))
            self.step("broker_rtt", lambda: measure.broker_round_trip(env, p.latency_tokens, p.latency_rate))
            self.step("idle", lambda: measure.idle(env, daemon, p.idle_s))

        return self._with(env, "latency", model, {"stream_interval_ms": 0}, body)

    def _cpu(self, env: Env, daemon: Any) -> None:
        p = self.plan
        self.step("cpu_rate", lambda: measure.cpu_at_rate(env, daemon, p.cpu_requests, p.cpu_tokens, p.cpu_rate))
        self.step(
            "cpu_rate_no_stream",
            lambda: measure.cpu_at_rate(env, daemon, p.cpu_requests, p.cpu_tokens, p.cpu_rate, stream=False),
        )

    def _first_chunk(self, env: Env, daemon: Any) -> None:
        p = self.plan
        self.step("first_chunk", lambda: measure.first_chunk(env, daemon, p.first_chunk_pairs, tokens=5))

    def _throughput(self, env: Env, interval_ms: int, name: str, queue_size: int, burst_queue: int | None) -> bool:
        p = self.plan
        tokens = max(p.throughput_tokens, p.long_reply_tokens)
        model = f"sim:rate=0,prefill_ms=0,tokens={tokens}"
        runtime = {"max_new_tokens": tokens}
        limits_ = {"stream_interval_ms": interval_ms, "queue_size": queue_size}
        with running_daemon(env, name, model, limits=limits_, runtime=runtime) as daemon:
            say(f"{name} daemon pid {daemon.pid}")
            if self.wanted("throughput"):
                self.step(name, lambda: measure.throughput(env, daemon, p.throughput_tokens, p.throughput_runs))
            if self.wanted("burst") and burst_queue == queue_size:
                result = self.step(
                    f"burst_q{queue_size}", lambda: measure.burst(env, daemon, p.burst_requests, queue_size)
                )
                if result is not None:
                    self.results.setdefault("burst", []).append(result)
                    del self.results[f"burst_q{queue_size}"]
            if self.wanted("throughput") and interval_ms == 0:
                self.step("long_reply", lambda: measure.long_reply(env, daemon, p.long_reply_tokens))
        return True

    def _recovery(self, env: Env, daemon: Any) -> None:
        p = self.plan
        self.step("recovery", lambda: measure.crash_recovery(env, daemon, p.crash_trials, p.crash_at))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (well under 2 minutes)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--broker-nodelay",
        action="store_true",
        help="start Mosquitto with set_tcp_nodelay true (default: Mosquitto's default, Nagle's algorithm on)",
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="directory for the JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    runner = Runner(plan, only, broker_nodelay=args.broker_nodelay)
    started = time.time()
    load_before = loadavg()
    gauge_before = speed_gauge_ms()
    cpu_before = machine_cpu()
    say(f"rkllm-mqtt bench, {plan.mode} mode; load average {load_before}")
    if load_before and load_before[0] > 0.5:
        say("warning: the machine is busy with other work; the figures will show it")
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="rkllm-bench-") as tmp:
            runner.run(Path(tmp))
    except (KeyboardInterrupt, TerminatedError):
        interrupted = True
        say("interrupted: everything started was stopped; writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
    head = report.headline(runner.results)
    use = machine_cpu_use(cpu_before, machine_cpu())
    gauge_after = speed_gauge_ms()
    document = {
        "mode": plan.mode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average": {"before": load_before, "after": loadavg()},
        "machine_cpu_during_run": use,
        "speed_gauge_ms": {"before": gauge_before, "after": gauge_after},
        "revision": git_revision(REPO),
        "plan": asdict(plan),
        "summary": head,
        "targets": report.evaluate(head),
        "errors": runner.errors,
        "interrupted": interrupted,
        "results": runner.results,
    }
    print(report.table(head))
    if runner.errors:
        print("\nErrors:")
        for name, error in runner.errors.items():
            print(f"  {name}: {error}")
    path = report.write_json(args.results, document)
    print(f"\nCPU speed gauge (fixed Python workload): {gauge_before} ms before, {gauge_after} ms after the run")
    if use:
        print(f"All CPUs during the run: {use['busy_percent']} % busy, {use['steal_percent']} % stolen by the host")
    print(f"Results: {path}  ({document['duration_s']:.0f} s, {plan.mode} mode)")
    if interrupted:
        return 130
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
