"""The HTTP path beside the MQTT path, in one run: ``python -m bench.http_path [--quick]`` from the repo root.

One daemon on the simulated runtime serves both front doors (Mosquitto for MQTT, the Ollama API for HTTP),
so both are measured against the same process, scheduler and worker:

- first-token latency: from sending a request (MQTT publish / HTTP POST) to its first streamed text arriving,
  requests alternating between the two doors, the runtime idle before each;
- CPU per token (parent + worker) while a stream runs at a realistic rate, requests back to back, per door;
- prefill: the tokens prefilled per turn over a 5-turn chat, with the KV cache reused between turns, and without
  (an MQTT request between turns takes the cache, so each turn prefills the whole conversation again).

Prints a table and writes ``bench/results/http-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.mqttc import Client, json_field
from bench.procs import LOOPBACK, Daemon, Mosquitto, free_port
from bench.stats import summary
from bench.sysinfo import cpu_delta, git_revision, machine, sample_cpu

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "simulated:latest"
SYSTEM = (
    "You are a voice assistant for a home. Answer in one short sentence. You can turn devices on and off, "
    "read sensors and set the thermostat. The house has a kitchen, a living room, two bedrooms and a garden."
)
TURNS = [
    "Is the kitchen light on?",
    "Turn it off please.",
    "What is the temperature in the living room?",
    "Set the thermostat to twenty one degrees.",
    "Thanks, that is all for now.",
]


@dataclass(frozen=True)
class Plan:
    latency_requests: int
    cpu_requests: int
    cpu_tokens: int
    cpu_rate: float


QUICK = Plan(latency_requests=10, cpu_requests=1, cpu_tokens=200, cpu_rate=20)
FULL = Plan(latency_requests=40, cpu_requests=3, cpu_tokens=200, cpu_rate=20)


class ApiDaemon(Daemon):
    """The bench's daemon with the Ollama API on a free port."""

    def __init__(self, workdir: Path, port: int, *, model: str, label: str) -> None:
        super().__init__(workdir, port, model=model, label=label)
        self.api_port = free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    def config(self) -> dict[str, dict[str, Any]]:
        sections = super().config()
        sections["api"] = {"enabled": True, "host": LOOPBACK, "port": self.api_port}
        return sections


def wait_ready(sub: Client, daemon: ApiDaemon) -> None:
    sub.subscribe(f"{daemon.root}/health", f"{daemon.root}/response/#", f"{daemon.root}/state")
    sub.wait_for(f"{daemon.root}/health", json_field("runtime", "ready"), timeout=60)


def wait_idle(sub: Client, daemon: ApiDaemon, after_ns: int) -> None:
    """The scheduler has finished the last request (its idle state was published after ``after_ns``)."""
    sub.wait_for(f"{daemon.root}/state", json_field("status", "idle"), timeout=60, after_ns=after_ns)


# -- first-token latency ------------------------------------------------------------------------------


def first_token_mqtt(pub: Client, sub: Client, daemon: ApiDaemon, tokens: int) -> float:
    rid = f"ft-{uuid.uuid4().hex[:8]}"
    topic = f"{daemon.root}/response/{rid}"
    sent = time.monotonic_ns()
    pub.publish(f"{daemon.root}/prompt", json.dumps({"id": rid, "prompt": "first", "max_new_tokens": tokens}))
    first = sub.wait_for(f"{topic}/stream", timeout=60, after_ns=sent)
    sub.wait_for(topic, timeout=60, after_ns=sent)
    return (first.at_ns - sent) / 1e6


def first_token_http(http: httpx.Client, tokens: int) -> float:
    body = {"model": MODEL, "prompt": "first", "options": {"num_predict": tokens}}
    sent = time.monotonic_ns()
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        at = time.monotonic_ns()
        for _ in lines:
            pass
    return (at - sent) / 1e6


def first_token(pub: Client, sub: Client, daemon: ApiDaemon, http: httpx.Client, requests: int) -> dict[str, Any]:
    mqtt_ms: list[float] = []
    http_ms: list[float] = []
    for _ in range(requests):
        mark = time.monotonic_ns()
        mqtt_ms.append(first_token_mqtt(pub, sub, daemon, 4))
        wait_idle(sub, daemon, mark)
        mark = time.monotonic_ns()
        http_ms.append(first_token_http(http, 4))
        wait_idle(sub, daemon, mark)
    return {"requests": requests, "mqtt_ms": summary(mqtt_ms[1:]), "http_ms": summary(http_ms[1:])}


# -- CPU per token --------------------------------------------------------------------------------------


def cpu_per_token(
    pub: Client, sub: Client, daemon: ApiDaemon, http: httpx.Client, plan: Plan, *, door: str
) -> dict[str, Any]:
    worker = daemon.worker_pid()
    before = sample_cpu([daemon.pid, worker])
    delivered = 0
    for _ in range(plan.cpu_requests):
        if door == "mqtt":
            rid = f"cpu-{uuid.uuid4().hex[:8]}"
            topic = f"{daemon.root}/response/{rid}"
            sent = time.monotonic_ns()
            pub.publish(
                f"{daemon.root}/prompt", json.dumps({"id": rid, "prompt": "cpu", "max_new_tokens": plan.cpu_tokens})
            )
            final = sub.wait_for(topic, timeout=plan.cpu_tokens / plan.cpu_rate * 3 + 30, after_ns=sent).json()
            delivered += int(final["usage"]["completion_tokens"])
        else:
            body = {"model": MODEL, "prompt": "cpu", "options": {"num_predict": plan.cpu_tokens}}
            with http.stream("POST", "/api/generate", json=body) as response:
                last: dict[str, Any] = {}
                for line in response.iter_lines():
                    last = json.loads(line)
            delivered += int(last.get("eval_count", 0))
    after = sample_cpu([daemon.pid, worker])
    cpu = cpu_delta(before, after)
    return {
        "door": door,
        "tokens": delivered,
        "rate": plan.cpu_rate,
        "cpu_us_per_token": round(cpu["cpu_ns"] / max(delivered, 1) / 1000, 1),
        "cpu_us_per_token_parent": round(cpu[f"cpu_ns_{daemon.pid}"] / max(delivered, 1) / 1000, 1),
        "cpu_us_per_token_worker": round(cpu[f"cpu_ns_{worker}"] / max(delivered, 1) / 1000, 1),
    }


# -- prefill over a conversation ----------------------------------------------------------------------------


def conversation(pub: Client, sub: Client, daemon: ApiDaemon, http: httpx.Client, *, interrupted: bool) -> list[int]:
    """Prefilled tokens of each turn of a 5-turn chat (the simulated runtime counts words)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    prefilled: list[int] = []
    for turn in TURNS:
        if interrupted:  # another request takes the KV cache between two turns
            rid = f"between-{uuid.uuid4().hex[:8]}"
            sent = time.monotonic_ns()
            pub.publish(f"{daemon.root}/prompt", json.dumps({"id": rid, "prompt": "meanwhile", "max_new_tokens": 2}))
            sub.wait_for(f"{daemon.root}/response/{rid}", timeout=60, after_ns=sent)
        messages.append({"role": "user", "content": turn})
        answer = http.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False}).json()
        prefilled.append(int(answer["prompt_eval_count"]))
        messages.append({"role": "assistant", "content": answer["message"]["content"]})
    return prefilled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "machine": machine(),
        "revision": git_revision(RESULTS.parent.parent),
        "mode": "quick" if args.quick else "full",
    }
    with tempfile.TemporaryDirectory(prefix="rkllm-bench-http-") as tmp, Mosquitto(Path(tmp)) as broker:
        sub = Client(broker.port, "bench-sub").start()
        pub = Client(broker.port, "bench-pub").start()
        try:
            latency_model = "sim:prefill_ms=0,rate=1000,tokens=100000"
            with ApiDaemon(Path(tmp), broker.port, model=latency_model, label="http-latency") as daemon:
                wait_ready(sub, daemon)
                with httpx.Client(base_url=daemon.url, timeout=120) as http:
                    results["first_token"] = first_token(pub, sub, daemon, http, plan.latency_requests)
            cpu_model = f"sim:prefill_ms=0,rate={plan.cpu_rate:g},tokens=100000"
            with ApiDaemon(Path(tmp), broker.port, model=cpu_model, label="http-cpu") as daemon:
                wait_ready(sub, daemon)
                with httpx.Client(base_url=daemon.url, timeout=120) as http:
                    results["cpu"] = [
                        cpu_per_token(pub, sub, daemon, http, plan, door=door) for door in ("mqtt", "http")
                    ]
            with ApiDaemon(
                Path(tmp), broker.port, model="sim:prefill_ms=0,rate=0,tokens=12", label="http-kv"
            ) as daemon:
                wait_ready(sub, daemon)
                with httpx.Client(base_url=daemon.url, timeout=120) as http:
                    reused = conversation(pub, sub, daemon, http, interrupted=False)
                    replayed = conversation(pub, sub, daemon, http, interrupted=True)
            results["prefill"] = {"turns": len(TURNS), "reused": reused, "replayed": replayed}
        finally:
            sub.stop()
            pub.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    ft = results["first_token"]
    print(
        f"first token, p50 (p90) ms: MQTT {ft['mqtt_ms']['p50']} ({ft['mqtt_ms']['p90']}), "
        f"HTTP {ft['http_ms']['p50']} ({ft['http_ms']['p90']}) over {ft['requests']} requests each"
    )
    for row in results["cpu"]:
        print(
            f"CPU per token at {row['rate']:g} tok/s, {row['door'].upper()}: {row['cpu_us_per_token']} µs "
            f"(parent {row['cpu_us_per_token_parent']}, worker {row['cpu_us_per_token_worker']}) "
            f"over {row['tokens']} tokens"
        )
    pre = results["prefill"]
    print(f"prefilled per turn, KV cache reused: {pre['reused']} (total {sum(pre['reused'])})")
    print(f"prefilled per turn, cache taken between turns: {pre['replayed']} (total {sum(pre['replayed'])})")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
