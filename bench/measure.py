"""The end-to-end measurements: a daemon on the simulated runtime behind Mosquitto, seen by an MQTT subscriber.

Every function takes a running daemon (see :func:`running_daemon`) and returns plain data for the report.
Times on the subscriber side are ``time.monotonic_ns()`` when paho hands the message over; the simulated
runtime's ``stamp=1`` tokens carry CLOCK_MONOTONIC at the callback, the same clock.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.mqttc import Client, Msg, json_field
from bench.procs import Daemon
from bench.stats import summary
from bench.sysinfo import context_switches, cpu_delta, memory, sample_cpu, thread_cpu_ns, thread_switches

READY_TIMEOUT_S = 30.0


@dataclass
class Env:
    """What every scenario shares: the broker's port, the work directory and two bench clients."""

    workdir: Path
    port: int
    broker_pid: int
    sub: Client  # subscribes to everything a scenario watches
    pub: Client  # publishes requests and the broker-only baseline
    startups: list[dict[str, Any]] = field(default_factory=list)
    daemons: list[dict[str, Any]] = field(default_factory=list)


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


# -- a daemon for a scenario ----------------------------------------------------------------------------


@contextlib.contextmanager
def running_daemon(
    env: Env, label: str, model: str, *, limits: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None
) -> Iterator[Daemon]:
    """Start a daemon, record its start-up (spawn to retained ``online``, and to health ``runtime: ready``),
    yield it, and on the way out record its memory and logged problems and stop it."""
    daemon = Daemon(env.workdir, env.port, model=model, limits=limits, runtime=runtime, label=label)
    # Subscribed before the spawn: the retained messages of a fresh node id can only come from this daemon.
    env.sub.subscribe(f"{daemon.root}/availability", f"{daemon.root}/health", f"{daemon.root}/response/#")
    record: dict[str, Any] = {"label": label, "node": daemon.node, "model": model, "limits": limits or {}}
    with daemon:
        try:
            online = env.sub.wait_for(
                f"{daemon.root}/availability", lambda m: m.payload == b"online", timeout=READY_TIMEOUT_S
            )
            ready = env.sub.wait_for(f"{daemon.root}/health", json_field("runtime", "ready"), timeout=READY_TIMEOUT_S)
        except TimeoutError as exc:
            raise RuntimeError(f"{label}: the daemon did not come up: {exc}\n{daemon.log_tail()}") from exc
        env.startups.append(
            {
                "label": label,
                "online_ms": ms(online.at_ns - daemon.spawned_ns),
                "ready_ms": ms(ready.at_ns - daemon.spawned_ns),
            }
        )
        try:
            yield daemon
        finally:
            with contextlib.suppress(Exception):
                record["memory_kb"] = {"parent": memory(daemon.pid), "worker": memory(daemon.worker_pid(1.0))}
            record["problems"] = daemon.problems()
            env.daemons.append(record)
            env.sub.unsubscribe(f"{daemon.root}/availability", f"{daemon.root}/health", f"{daemon.root}/response/#")
    record["exit_code"] = daemon.exit_code
    env.sub.forget(daemon.root)


def _request(env: Env, daemon: Daemon, rid: str, **fields: Any) -> str:
    """Publish a JSON request; returns its final response topic."""
    env.pub.publish(f"{daemon.root}/prompt", json.dumps({"id": rid, **fields})).wait_for_publish(10)
    return f"{daemon.root}/response/{rid}"


def _chunks(env: Env, final_topic: str) -> tuple[list[Msg], list[dict[str, Any]]]:
    msgs = env.sub.messages(f"{final_topic}/stream")
    return msgs, [m.json() for m in msgs]


def _seq_ok(chunks: list[dict[str, Any]]) -> bool:
    return [c["seq"] for c in chunks] == list(range(len(chunks)))


# -- 1. token latency --------------------------------------------------------------------------------


def token_latency(env: Env, daemon: Daemon, tokens: int, rate: float, warmup: int = 5) -> dict[str, Any]:
    """Callback (stamp) to subscriber, per token, with ``stream_interval_ms = 0``."""
    rid = f"lat-{uuid.uuid4().hex[:6]}"
    final_topic = _request(env, daemon, rid, prompt="latency", max_new_tokens=tokens)
    final = env.sub.wait_for(final_topic, timeout=tokens / rate * 2 + 30).json()
    msgs, chunks = _chunks(env, final_topic)
    latencies: list[float] = []
    for msg, chunk in zip(msgs, chunks, strict=True):
        latencies.extend((msg.at_ns - int(stamp)) / 1e6 for stamp in chunk["text"].split())
    received = len(latencies)
    return {
        "tokens": tokens,
        "rate": rate,
        "state": final["state"],
        "completion_tokens": final["usage"]["completion_tokens"],
        "tokens_received": received,
        "chunks": len(chunks),
        "seq_ok": _seq_ok(chunks),
        "lost": final["usage"]["completion_tokens"] - received,
        "latency_ms": summary(latencies[warmup:]),
    }


def broker_round_trip(env: Env, count: int, rate: float, warmup: int = 5) -> dict[str, Any]:
    """A bench publisher to the bench subscriber through the same broker, QoS 1 like the bridge's chunks."""
    topic = f"bench/rtt/{uuid.uuid4().hex[:8]}"
    env.sub.subscribe(topic)
    period_ns = int(1e9 / rate)
    start = time.monotonic_ns() + period_ns
    for i in range(count):
        delay = (start + i * period_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        env.pub.publish(topic, f"{i} {time.monotonic_ns()}")
    last = f"{count - 1} ".encode()
    env.sub.wait_for(topic, lambda m: m.payload.startswith(last), timeout=30)
    latencies = []
    for msg in env.sub.messages(topic):
        _, stamp = msg.payload.split()
        latencies.append((msg.at_ns - int(stamp)) / 1e6)
    env.sub.unsubscribe(topic)
    env.sub.forget(topic)
    return {"count": count, "rate": rate, "received": len(latencies), "latency_ms": summary(latencies[warmup:])}


# -- 2./3. throughput and CPU per token ------------------------------------------------------------------


STALL_S = 5.0  # no new chunk and no final response for this long: the reply is taken as lost


def _await_final(env: Env, final_topic: str, stall_s: float = STALL_S, cap_s: float = 600.0) -> Msg | None:
    """The final response, or None once the stream made no progress for ``stall_s`` without one."""
    stream = f"{final_topic}/stream"
    seen, progress_at = -1, time.monotonic()
    deadline = time.monotonic() + cap_s
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            return env.sub.wait_for(final_topic, timeout=2.0)
        count = env.sub.count(stream)
        if count != seen:
            seen, progress_at = count, time.monotonic()
        elif time.monotonic() - progress_at > stall_s:
            return None
    return None


def stream_run(env: Env, daemon: Daemon, rid: str, tokens: int) -> dict[str, Any]:
    """One request of ``tokens`` tokens at rate=0: tokens delivered to the subscriber per second (request published
    to final response received), what got lost, and the CPU per delivered token of the daemon (parent + worker),
    of Mosquitto and of the bench's own clients."""
    worker = daemon.worker_pid()
    pids = [daemon.pid, worker, env.broker_pid]
    before = sample_cpu(pids)
    bench_before = time.process_time_ns()
    sent = time.monotonic_ns()
    final_topic = _request(env, daemon, rid, prompt="throughput", max_new_tokens=tokens)
    final_msg = _await_final(env, final_topic)
    after = sample_cpu(pids)
    bench_cpu = time.process_time_ns() - bench_before
    msgs, chunks = _chunks(env, final_topic)
    env.sub.forget(final_topic)
    text = "".join(c["text"] for c in chunks)
    delivered = len(text.split())
    cpu = cpu_delta(before, after)
    daemon_ns = cpu[f"cpu_ns_{daemon.pid}"] + cpu[f"cpu_ns_{worker}"]
    per_token = max(delivered, 1) * 1000
    row: dict[str, Any] = {
        "final_received": final_msg is not None,
        "tokens_delivered": delivered,
        "chunks": len(chunks),
        "seq_ok": _seq_ok(chunks),
        "cpu_us_per_token": round(daemon_ns / per_token, 2),
        "cpu_us_per_token_parent": round(cpu[f"cpu_ns_{daemon.pid}"] / per_token, 2),
        "cpu_us_per_token_worker": round(cpu[f"cpu_ns_{worker}"] / per_token, 2),
        "cpu_us_per_token_broker": round(cpu[f"cpu_ns_{env.broker_pid}"] / per_token, 2),
        "cpu_us_per_token_bench_clients": round(bench_cpu / per_token, 2),
        "daemon_core_percent": round(daemon_ns / cpu["wall_ns"] * 100, 1),
        "parent_peak_rss_kb": memory(daemon.pid).get("VmHWM"),
    }
    if final_msg is None:
        row.update(lost=tokens - delivered, tokens_per_s=None)
        return row
    final = final_msg.json()
    seconds = (final_msg.at_ns - sent) / 1e9
    row.update(
        state=final["state"],
        completion_tokens=final["usage"]["completion_tokens"],
        lost=final["usage"]["completion_tokens"] - delivered,
        text_matches_final=text == final["text"],
        seconds=round(seconds, 3),
        tokens_per_s=round(delivered / seconds),
        last_chunk_to_final_ms=ms(final_msg.at_ns - msgs[-1].at_ns) if msgs else None,
        # How fast the bridge took tokens from the runtime (its own timing), whatever the delivery.
        generation_tokens_per_s=final["timing"]["tokens_per_s"],
    )
    return row


def throughput(env: Env, daemon: Daemon, tokens: int, runs: int) -> dict[str, Any]:
    """``runs`` requests of ``tokens`` tokens at rate=0, after a short warm-up; the best run counts."""
    _request(env, daemon, "warmup", prompt="warm up", max_new_tokens=1000)
    env.sub.wait_for(f"{daemon.root}/response/warmup", timeout=60)
    results = [stream_run(env, daemon, f"tp-{run}-{uuid.uuid4().hex[:6]}", tokens) for run in range(runs)]
    done = [r for r in results if r["tokens_per_s"] is not None]
    return {
        "tokens": tokens,
        "runs": results,
        "tokens_per_s": max(r["tokens_per_s"] for r in done) if done else None,
        "cpu_us_per_token": min(r["cpu_us_per_token"] for r in done) if done else None,
        "lost": sum(r["lost"] for r in results),
        "all_seq_ok": all(r["seq_ok"] and r.get("text_matches_final") for r in results),
    }


def long_reply(env: Env, daemon: Daemon, tokens: int) -> dict[str, Any]:
    """One reply longer than the 65,535 message ids of an MQTT session, as fast as the runtime goes: every chunk
    and the final response must still arrive."""
    row = stream_run(env, daemon, f"long-{uuid.uuid4().hex[:6]}", tokens)
    return {"tokens": tokens, **row}


def cpu_at_rate(
    env: Env, daemon: Daemon, requests: int, tokens: int, rate: float, *, stream: bool = True
) -> dict[str, Any]:
    """The daemon's CPU per token while a realistic stream runs (requests back to back). With ``stream=False``
    nothing is published per token: what is left is the runtime side (worker, event pipe, run loop)."""
    worker = daemon.worker_pid()
    switches_before = {pid: context_switches(pid)["voluntary"] for pid in (daemon.pid, worker)}
    threads_before = {pid: (thread_cpu_ns(pid), thread_switches(pid)) for pid in (daemon.pid, worker)}
    before = sample_cpu([daemon.pid, worker])
    delivered = 0
    for i in range(requests):
        final = env.sub.wait_for(
            _request(env, daemon, f"cpu-{stream:d}-{i}", prompt="cpu", max_new_tokens=tokens, stream=stream),
            timeout=tokens / rate * 2 + 30,
        ).json()
        delivered += int(final["usage"]["completion_tokens"])
    after = sample_cpu([daemon.pid, worker])
    switches = {pid: context_switches(pid)["voluntary"] - switches_before[pid] for pid in (daemon.pid, worker)}
    threads_after = {pid: (thread_cpu_ns(pid), thread_switches(pid)) for pid in (daemon.pid, worker)}
    cpu = cpu_delta(before, after)

    def by_thread(pid: int) -> list[dict[str, float]]:
        """Per thread (by id; attach py-spy dump to name them): CPU and wake-ups per token, busiest first."""
        (cpu0, sw0), (cpu1, sw1) = threads_before[pid], threads_after[pid]
        rows = [
            {
                "tid": tid,
                "cpu_us_per_token": round((ns - cpu0.get(tid, 0)) / max(delivered, 1) / 1000, 1),
                "wakeups_per_token": round((sw1.get(tid, 0) - sw0.get(tid, 0)) / max(delivered, 1), 2),
            }
            for tid, ns in cpu1.items()
        ]
        return sorted((r for r in rows if r["cpu_us_per_token"] > 0), key=lambda r: -r["cpu_us_per_token"])

    return {
        "requests": requests,
        "stream": stream,
        "tokens": delivered,
        "rate": rate,
        "seconds": round(cpu["wall_ns"] / 1e9, 2),
        "cpu_ms": ms(cpu["cpu_ns"]),
        "cpu_us_per_token": round(cpu["cpu_ns"] / max(delivered, 1) / 1000, 2),
        "cpu_us_per_token_parent": round(cpu[f"cpu_ns_{daemon.pid}"] / max(delivered, 1) / 1000, 2),
        "cpu_us_per_token_worker": round(cpu[f"cpu_ns_{worker}"] / max(delivered, 1) / 1000, 2),
        "cpu_ms_from_ticks": ms(cpu["cpu_ns_from_ticks"]),
        "core_percent": round(cpu["cpu_ns"] / cpu["wall_ns"] * 100, 3),
        # Each voluntary context switch is a thread going to sleep, i.e. one wake-up later.
        "wakeups_per_token_parent": round(switches[daemon.pid] / max(delivered, 1), 2),
        "wakeups_per_token_worker": round(switches[worker] / max(delivered, 1), 2),
        "threads_parent": by_thread(daemon.pid),
        "threads_worker": by_thread(worker),
    }


def first_chunk(env: Env, daemon: Daemon, pairs: int, tokens: int, idle_s: float = 1.0) -> dict[str, Any]:
    """Publish to first stream chunk of a request on an idle bridge (published ``idle_s`` after the previous
    final response) and of one published the moment the previous request's final response arrived."""
    idle_ms: list[float] = []
    follow_ms: list[float] = []

    def first_of(rid: str) -> tuple[float, Msg]:
        sent = time.monotonic_ns()
        final_topic = _request(env, daemon, rid, prompt="first chunk", max_new_tokens=tokens)
        first = env.sub.wait_for(f"{final_topic}/stream", timeout=60)
        final = env.sub.wait_for(final_topic, timeout=tokens * 2 + 60)
        env.sub.forget(final_topic)
        return (first.at_ns - sent) / 1e6, final

    tag = uuid.uuid4().hex[:6]
    for i in range(pairs):
        time.sleep(idle_s)
        latency, _ = first_of(f"idle-{tag}-{i}")
        idle_ms.append(latency)
        latency, _ = first_of(f"next-{tag}-{i}")  # published as soon as the previous final arrived
        follow_ms.append(latency)
    return {
        "pairs": pairs,
        "tokens": tokens,
        "idle_ms": summary(idle_ms),
        "following_ms": summary(follow_ms),
        "all_idle_ms": [round(v, 3) for v in idle_ms],
        "all_following_ms": [round(v, 3) for v in follow_ms],
    }


def idle(env: Env, daemon: Daemon, seconds: float, settle_s: float = 1.0) -> dict[str, Any]:
    """CPU and wake-ups of the connected, idle daemon (parent + worker) over a quiet stretch."""
    time.sleep(settle_s)
    worker = daemon.worker_pid()
    pids = [daemon.pid, worker]
    switches_before = {pid: context_switches(pid) for pid in pids}
    threads_before = {pid: thread_switches(pid) for pid in pids}
    before = sample_cpu(pids)
    time.sleep(seconds)
    after = sample_cpu(pids)
    switches_after = {pid: context_switches(pid) for pid in pids}
    threads_after = {pid: thread_switches(pid) for pid in pids}
    cpu = cpu_delta(before, after)
    wall_s = cpu["wall_ns"] / 1e9

    def wakeups(pid: int) -> float:
        return round((switches_after[pid]["voluntary"] - switches_before[pid]["voluntary"]) / wall_s, 2)

    def busy_threads(pid: int) -> dict[str, float]:
        rates = {tid: (n - threads_before[pid].get(tid, 0)) / wall_s for tid, n in threads_after[pid].items()}
        return {str(tid): round(rate, 2) for tid, rate in rates.items() if rate > 0}

    return {
        "seconds": round(wall_s, 2),
        "cpu_ms": ms(cpu["cpu_ns"]),
        "core_percent": round(cpu["cpu_ns"] / cpu["wall_ns"] * 100, 4),
        "core_percent_parent": round(cpu[f"cpu_ns_{daemon.pid}"] / cpu["wall_ns"] * 100, 4),
        "core_percent_worker": round(cpu[f"cpu_ns_{worker}"] / cpu["wall_ns"] * 100, 4),
        "wakeups_per_s_parent": wakeups(daemon.pid),
        "wakeups_per_s_worker": wakeups(worker),
        "wakeups_per_s_by_thread_parent": busy_threads(daemon.pid),
        "wakeups_per_s_by_thread_worker": busy_threads(worker),
        "threads_parent": switches_after[daemon.pid]["threads"],
        "threads_worker": switches_after[worker]["threads"],
        "memory_kb": {"parent": memory(daemon.pid), "worker": memory(worker)},
    }


# -- 5. recovery after a worker crash --------------------------------------------------------------------


def crash_recovery(env: Env, daemon: Daemon, trials: int, crash_at: int) -> dict[str, Any]:
    """A request crashes the worker (sim ``crash_at``); the next one is published the moment the crash's final
    response arrives. Times from that final response to health ``runtime: ready`` and to the next ``done``."""
    health = f"{daemon.root}/health"
    rows = []
    for trial in range(trials):
        crashed = env.sub.wait_for(_request(env, daemon, f"crash-{trial}", prompt="crash"), timeout=60)
        code = (crashed.json().get("error") or {}).get("code")
        after_topic = _request(env, daemon, f"after-{trial}", prompt="after", max_new_tokens=crash_at - 1)
        ready = env.sub.wait_for(health, json_field("runtime", "ready"), timeout=60, after_ns=crashed.at_ns)
        done = env.sub.wait_for(after_topic, timeout=60)
        rows.append(
            {
                "crash_code": code,
                "to_ready_ms": ms(ready.at_ns - crashed.at_ns),
                "to_next_done_ms": ms(done.at_ns - crashed.at_ns),
                "next_state": done.json()["state"],
            }
        )
    backoff_s = float(daemon.runtime.get("restart_backoff_s", 1.0))  # the daemon's default unless configured
    return {
        "trials": rows,
        "restart_backoff_s": backoff_s,
        # The deliberate wait before a restart is the bulk of it; the rest is a new worker loading the model.
        "respawn_ms": summary([r["to_ready_ms"] - backoff_s * 1000 for r in rows]),
        "to_ready_ms": summary([r["to_ready_ms"] for r in rows]),
        "to_next_done_ms": summary([r["to_next_done_ms"] for r in rows]),
        "all_recovered": all(r["crash_code"] == "runtime_crashed" and r["next_state"] == "done" for r in rows),
        "workers_started": len(daemon.worker_pids()),
    }


# -- 6. a burst of requests ------------------------------------------------------------------------------


def burst(env: Env, daemon: Daemon, count: int, queue_size: int, tokens: int = 16) -> dict[str, Any]:
    """``count`` JSON requests with ids, published back to back; every one must get exactly one final response."""
    prefix = f"{daemon.root}/response/"
    tag = uuid.uuid4().hex[:6]
    ids = [f"burst-{tag}-{i:04d}" for i in range(count)]
    wanted = set(ids)
    answers: dict[str, list[tuple[str, str | None]]] = {}
    last_at = [0]
    all_in = threading.Event()
    lock = threading.Lock()

    def on_final(msg: Msg) -> None:
        rid = msg.topic[len(prefix) :]
        if not msg.topic.startswith(prefix) or rid not in wanted:
            return
        data = msg.json()
        with lock:
            answers.setdefault(rid, []).append((data["state"], (data.get("error") or {}).get("code")))
            last_at[0] = msg.at_ns
            if len(answers) == count:
                all_in.set()

    payloads = [json.dumps({"id": rid, "prompt": "burst", "stream": False, "max_new_tokens": tokens}) for rid in ids]
    topic = f"{daemon.root}/prompt"
    env.sub.add_hook(on_final)
    try:
        started = time.monotonic_ns()
        infos = [env.pub.publish(topic, payload) for payload in payloads]
        for info in infos:
            info.wait_for_publish(30)
        published = time.monotonic_ns()
        complete = all_in.wait(120)
        time.sleep(1.0)  # anything answered twice would arrive now
    finally:
        env.sub.remove_hook(on_final)
    with lock:
        outcomes: dict[str, int] = {}
        for replies in answers.values():
            state, code = replies[0]
            key = "done" if state == "done" else (code or state)
            outcomes[key] = outcomes.get(key, 0) + 1
        twice = sum(1 for replies in answers.values() if len(replies) > 1)
        answered = len(answers)
    env.sub.forget(prefix)
    return {
        "requests": count,
        "queue_size": queue_size,
        "tokens_per_request": tokens,
        "answered": answered,
        "missing": count - answered,
        "answered_twice": twice,
        "outcomes": outcomes,
        "complete": complete,
        "publish_ms": ms(published - started),
        "drain_ms": ms(last_at[0] - started) if answered else None,
    }
