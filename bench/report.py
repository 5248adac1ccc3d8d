"""Headline figures, targets with PASS/MISS, the printed table and the JSON file."""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import median


def dig(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for path "a.b"; None when any step is missing."""
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the table shows, computed from the raw results (missing parts stay None)."""
    startups = results.get("startup") or []
    online = [s["online_ms"] for s in startups]
    ready = [s["ready_ms"] for s in startups]
    binding = dig(results, "binding.tokens_per_s")
    idle_mem = dig(results, "idle.memory_kb") or {}
    peaks = [dig(d, "memory_kb.parent.VmHWM") for d in results.get("daemons", [])]
    peaks = [p for p in peaks if p is not None]
    bursts = results.get("burst") or []
    streams_lost = [
        dig(results, "latency.lost"),
        dig(results, "throughput_stream.lost"),
        dig(results, "throughput_coalesced.lost"),
        dig(results, "long_reply.lost"),
    ]
    seq_ok = [
        dig(results, "latency.seq_ok"),
        dig(results, "throughput_stream.all_seq_ok"),
        dig(results, "throughput_coalesced.all_seq_ok"),
        dig(results, "long_reply.seq_ok"),
        dig(results, "long_reply.final_received"),
    ]
    lost_parts = [b.get("missing") for b in bursts] + [b.get("answered_twice") for b in bursts] + streams_lost
    measured = [x for x in lost_parts if x is not None]
    nothing_lost = None
    if measured:
        nothing_lost = (
            sum(abs(x) for x in measured) == 0
            and all(b.get("complete") for b in bursts)
            and all(s for s in seq_ok if s is not None)
        )
    return {
        "latency_p50_ms": dig(results, "latency.latency_ms.p50"),
        "latency_p99_ms": dig(results, "latency.latency_ms.p99"),
        "supervisor_latency_p50_ms": dig(results, "supervisor_latency.latency_ms.p50"),
        "supervisor_latency_p99_ms": dig(results, "supervisor_latency.latency_ms.p99"),
        "broker_p50_ms": dig(results, "broker_rtt.latency_ms.p50"),
        "broker_p99_ms": dig(results, "broker_rtt.latency_ms.p99"),
        "latency_bridge_share_p50_ms": _diff(
            dig(results, "latency.latency_ms.p50"), dig(results, "broker_rtt.latency_ms.p50")
        ),
        "latency_ratio_p50": _ratio(dig(results, "latency.latency_ms.p50"), dig(results, "broker_rtt.latency_ms.p50")),
        "latency_ratio_p99": _ratio(dig(results, "latency.latency_ms.p99"), dig(results, "broker_rtt.latency_ms.p99")),
        "binding_tokens_per_s": binding,
        "supervisor_tokens_per_s": dig(results, "supervisor.tokens_per_s"),
        "stream_tokens_per_s": dig(results, "throughput_stream.tokens_per_s"),
        "coalesced_tokens_per_s": dig(results, "throughput_coalesced.tokens_per_s"),
        "supervisor_vs_binding": _ratio(dig(results, "supervisor.tokens_per_s"), binding),
        "stream_vs_binding": _ratio(dig(results, "throughput_stream.tokens_per_s"), binding),
        "coalesced_vs_binding": _ratio(dig(results, "throughput_coalesced.tokens_per_s"), binding),
        "cpu_us_per_token_rate": dig(results, "cpu_rate.cpu_us_per_token"),
        "cpu_us_per_token_rate_parent": dig(results, "cpu_rate.cpu_us_per_token_parent"),
        "cpu_us_per_token_rate_worker": dig(results, "cpu_rate.cpu_us_per_token_worker"),
        "wakeups_per_token_parent": dig(results, "cpu_rate.wakeups_per_token_parent"),
        "wakeups_per_token_worker": dig(results, "cpu_rate.wakeups_per_token_worker"),
        "cpu_us_per_token_rate_no_stream": dig(results, "cpu_rate_no_stream.cpu_us_per_token"),
        "cpu_us_per_token_rate_no_stream_parent": dig(results, "cpu_rate_no_stream.cpu_us_per_token_parent"),
        "first_chunk_idle_p50_ms": dig(results, "first_chunk.idle_ms.p50"),
        "first_chunk_following_p50_ms": dig(results, "first_chunk.following_ms.p50"),
        "first_chunk_following_vs_idle": _ratio(
            dig(results, "first_chunk.following_ms.p50"), dig(results, "first_chunk.idle_ms.p50")
        ),
        "cpu_us_per_token_stream": dig(results, "throughput_stream.cpu_us_per_token"),
        "stream_generation_tokens_per_s": _best_run(results, "throughput_stream", "generation_tokens_per_s"),
        "stream_broker_us_per_token": _best_run(results, "throughput_stream", "cpu_us_per_token_broker"),
        "stream_bench_us_per_token": _best_run(results, "throughput_stream", "cpu_us_per_token_bench_clients"),
        "cpu_us_per_token_coalesced": dig(results, "throughput_coalesced.cpu_us_per_token"),
        "long_reply_tokens": dig(results, "long_reply.tokens"),
        "long_reply_final": dig(results, "long_reply.final_received"),
        "long_reply_lost": dig(results, "long_reply.lost"),
        "long_reply_peak_rss_mb": _mb(dig(results, "long_reply.parent_peak_rss_kb")),
        "cpu_us_per_token_supervisor": dig(results, "supervisor.cpu_us_per_token"),
        "idle_core_percent": dig(results, "idle.core_percent"),
        "idle_wakeups_parent": dig(results, "idle.wakeups_per_s_parent"),
        "idle_wakeups_worker": dig(results, "idle.wakeups_per_s_worker"),
        "rss_parent_mb": _mb(dig(idle_mem, "parent.VmRSS")),
        "rss_worker_mb": _mb(dig(idle_mem, "worker.VmRSS")),
        "pss_parent_mb": _mb(dig(idle_mem, "parent.Pss")),
        "pss_worker_mb": _mb(dig(idle_mem, "worker.Pss")),
        "peak_rss_parent_mb": _mb(max(peaks)) if peaks else None,
        "startup_online_first_ms": online[0] if online else None,
        "startup_ready_first_ms": ready[0] if ready else None,
        "startup_online_median_ms": median(online) if online else None,
        "startup_ready_median_ms": median(ready) if ready else None,
        "startup_ready_max_ms": max(ready) if ready else None,
        "recovery_ready_ms": dig(results, "recovery.to_ready_ms.p50"),
        "recovery_next_done_ms": dig(results, "recovery.to_next_done_ms.p50"),
        "recovery_backoff_ms": _times(dig(results, "recovery.restart_backoff_s"), 1000),
        "recovery_respawn_ms": dig(results, "recovery.respawn_ms.p50"),
        "burst": [
            {k: b.get(k) for k in ("queue_size", "answered", "missing", "answered_twice", "outcomes", "drain_ms")}
            for b in bursts
        ],
        "nothing_lost": nothing_lost,
    }


def _diff(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return round(a - b, 3)
    return None


def _times(a: Any, factor: float) -> float | None:
    return round(a * factor, 3) if isinstance(a, int | float) else None


def _best_run(results: dict[str, Any], name: str, key: str) -> Any:
    """``key`` of the run with the most tokens/s of throughput scenario ``name``."""
    runs = dig(results, f"{name}.runs") or []
    if not runs:
        return None
    return max(runs, key=lambda r: r.get("tokens_per_s") or 0).get(key)


def _mb(kb: Any) -> float | None:
    return round(kb / 1024, 1) if isinstance(kb, int | float) else None


@dataclass(frozen=True)
class Target:
    key: str
    op: str  # "<=" or ">=" or "is"
    limit: Any
    text: str

    def check(self, value: Any) -> str:
        if value is None:
            return "n/a"
        compare: Callable[[Any, Any], bool] = {"<=": operator.le, ">=": operator.ge, "is": operator.is_}[self.op]
        return "PASS" if compare(value, self.limit) else "MISS"


TARGETS = [
    Target("latency_p50_ms", "<=", 1.0, "<= 1 ms"),
    Target("latency_p99_ms", "<=", 5.0, "<= 5 ms"),
    Target("coalesced_tokens_per_s", ">=", 20_000, ">= 20,000"),
    Target("latency_ratio_p50", "<=", 1.2, "<= 1.2x"),
    Target("cpu_us_per_token_rate", "<=", 400.0, "<= 400 us"),
    Target("first_chunk_following_vs_idle", "<=", 1.2, "<= 1.2x"),
    Target("cpu_us_per_token_stream", "<=", 30.0, "<= 30 us"),
    Target("cpu_us_per_token_coalesced", "<=", 30.0, "<= 30 us"),
    Target("idle_core_percent", "<=", 0.2, "<= 0.2 %"),
    Target("rss_parent_mb", "<=", 45.0, "<= 45 MB"),
    Target("startup_online_first_ms", "<=", 1000.0, "<= 1000 ms"),
    Target("startup_ready_first_ms", "<=", 1000.0, "<= 1000 ms"),
    Target("startup_ready_max_ms", "<=", 1000.0, "<= 1000 ms"),
    Target("nothing_lost", "is", True, "nothing lost"),
]

ROWS: list[tuple[str, str, str]] = [
    ("Token latency p50, callback to subscriber (50 tok/s, interval 0)", "latency_p50_ms", "ms"),
    ("Token latency p99", "latency_p99_ms", "ms"),
    ("Broker round trip p50 (paho -> Mosquitto -> paho, QoS 1)", "broker_p50_ms", "ms"),
    ("Broker round trip p99", "broker_p99_ms", "ms"),
    ("Token latency p50 minus broker round trip p50", "latency_bridge_share_p50_ms", "ms"),
    ("Callback to the supervisor's sink p50 (no MQTT)", "supervisor_latency_p50_ms", "ms"),
    ("Callback to the supervisor's sink p99 (no MQTT)", "supervisor_latency_p99_ms", "ms"),
    ("Latency ratio p50 (token latency / broker round trip)", "latency_ratio_p50", "x"),
    ("Latency ratio p99", "latency_ratio_p99", "x"),
    ("Throughput: binding alone (in-process, no MQTT)", "binding_tokens_per_s", "tok/s"),
    ("Throughput: supervisor alone (worker + pipe, no MQTT)", "supervisor_tokens_per_s", "tok/s"),
    ("Throughput end to end, stream_interval_ms = 0", "stream_tokens_per_s", "tok/s"),
    ("  interval 0: rate the bridge took tokens from the runtime", "stream_generation_tokens_per_s", "tok/s"),
    ("  interval 0: Mosquitto CPU per token delivered", "stream_broker_us_per_token", "us"),
    ("  interval 0: bench clients' CPU per token delivered", "stream_bench_us_per_token", "us"),
    ("Throughput end to end, coalesced (stream_interval_ms = 50)", "coalesced_tokens_per_s", "tok/s"),
    ("  supervisor / binding", "supervisor_vs_binding", "x"),
    ("  end to end interval 0 / binding", "stream_vs_binding", "x"),
    ("  end to end coalesced / binding", "coalesced_vs_binding", "x"),
    ("Long reply at full speed, interval 0: tokens", "long_reply_tokens", ""),
    ("  final response received", "long_reply_final", ""),
    ("  tokens lost", "long_reply_lost", ""),
    ("  parent peak RSS (VmHWM)", "long_reply_peak_rss_mb", "MB"),
    ("CPU per token at 20 tok/s (parent + worker)", "cpu_us_per_token_rate", "us"),
    ("  parent", "cpu_us_per_token_rate_parent", "us"),
    ("  worker (includes the simulator's own waiting)", "cpu_us_per_token_rate_worker", "us"),
    ("  wake-ups per token, parent", "wakeups_per_token_parent", ""),
    ("  wake-ups per token, worker", "wakeups_per_token_worker", ""),
    ("CPU per token at 20 tok/s, not streamed (runtime side only)", "cpu_us_per_token_rate_no_stream", "us"),
    ("  parent", "cpu_us_per_token_rate_no_stream_parent", "us"),
    ("First chunk, request on an idle bridge (p50, publish to chunk)", "first_chunk_idle_p50_ms", "ms"),
    ("First chunk, request right after another's final (p50)", "first_chunk_following_p50_ms", "ms"),
    ("  following / idle", "first_chunk_following_vs_idle", "x"),
    ("CPU per token at full speed, interval 0", "cpu_us_per_token_stream", "us"),
    ("CPU per token at full speed, coalesced", "cpu_us_per_token_coalesced", "us"),
    ("CPU per token, supervisor alone (no MQTT)", "cpu_us_per_token_supervisor", "us"),
    ("Idle CPU (parent + worker), % of one core", "idle_core_percent", "%"),
    ("Idle wake-ups/s, parent", "idle_wakeups_parent", "/s"),
    ("Idle wake-ups/s, worker", "idle_wakeups_worker", "/s"),
    ("RSS parent, idle", "rss_parent_mb", "MB"),
    ("RSS worker (simulated runtime, no model), idle", "rss_worker_mb", "MB"),
    ("PSS parent / worker, idle", "pss_parent_mb", "MB"),
    ("", "pss_worker_mb", "MB"),
    ("Peak RSS parent (VmHWM, any scenario)", "peak_rss_parent_mb", "MB"),
    ("Start-up to online, first daemon", "startup_online_first_ms", "ms"),
    ("Start-up to runtime ready, first daemon", "startup_ready_first_ms", "ms"),
    ("Start-up to online, median of all daemons", "startup_online_median_ms", "ms"),
    ("Start-up to runtime ready, median of all daemons", "startup_ready_median_ms", "ms"),
    ("Start-up to runtime ready, slowest daemon", "startup_ready_max_ms", "ms"),
    ("Recovery: crash response to health ready (median)", "recovery_ready_ms", "ms"),
    ("  of which restart_backoff_s (deliberate wait)", "recovery_backoff_ms", "ms"),
    ("  of which a new worker starting and loading (median)", "recovery_respawn_ms", "ms"),
    ("Recovery: crash response to next request done (median)", "recovery_next_done_ms", "ms"),
    ("Nothing lost (bursts, streams, long reply: no gap, no duplicate)", "nothing_lost", ""),
]


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and unit in ("ms", "us", "x", "%", "/s", "MB", ""):
        return f"{value:,.3f} {unit}" if abs(value) < 10 else f"{value:,.1f} {unit}"
    if isinstance(value, int | float):
        return f"{value:,.0f} {unit}".strip()
    return f"{value} {unit}".strip()


def evaluate(head: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"key": t.key, "value": head.get(t.key), "target": t.text, "result": t.check(head.get(t.key))} for t in TARGETS
    ]


def table(head: dict[str, Any]) -> str:
    targets = {t.key: t for t in TARGETS}
    lines = []
    width = max(len(label) for label, _, _ in ROWS)
    for label, key, unit in ROWS:
        value = head.get(key)
        target = targets.get(key)
        check = target.check(value) if target else ""
        text = target.text if target else ""
        shown = label or " " * width
        lines.append(f"{shown:<{width}}  {_fmt(value, unit):>16}  {text:>12}  {check}".rstrip())
    for b in head.get("burst") or []:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted((b.get("outcomes") or {}).items()))
        drain = b.get("drain_ms")
        drain_text = f"{drain / 1000:.2f} s" if isinstance(drain, int | float) else "-"
        lines.append(
            f"Burst of {b.get('answered', 0) + (b.get('missing') or 0)} requests, queue_size {b.get('queue_size')}: "
            f"answered {b.get('answered')}, missing {b.get('missing')}, twice {b.get('answered_twice')} "
            f"({outcomes}); drained in {drain_text}"
        )
    return "\n".join(lines)


def write_json(directory: Path, document: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    path = directory / f"{stamp}.json"
    suffix = 1
    while path.exists() and suffix < 100:
        path = directory / f"{stamp}-{suffix}.json"
        suffix += 1
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path
