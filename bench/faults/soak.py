"""Soak: random requests for a long time while the runtime fails and the broker restarts.

``python -m bench.faults.soak [--minutes 30] [--broker-every-s 180] [--rotate-s 60]``

One daemon, a Mosquitto with persistence, and a client with a persistent session sending random requests
(1-10 tokens, streamed or not, some in sessions, some aborted, a few invalid). Every ``--rotate-s`` seconds the
simulated runtime's fault changes (crash, hang, error at token 7, or none; the worker is SIGKILLed so the next
one loads it); every ``--broker-every-s`` seconds Mosquitto is restarted (SIGTERM, down for a second, started
again with its saved state).

Invariants (exit status 1 when one fails): no request lost (each one sent gets a final), none answered twice (two
different finals for one id), the daemon's RSS grows by less than ``--rss-mb`` (5 MB) and its number of open file
descriptors does not grow, between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import (
    FaultDaemon,
    PersistentMosquitto,
    Recorder,
    Verdict,
    Workdir,
    fd_count,
    rss_kb,
    say,
    stop_on_sigterm,
    wait_ready,
)

BASE_SPEC = "tokens=10,rate=100,prefill_ms=20"
FAULTS = ("", "crash_at=7", "hang_at=7", "error_at=7")
WARMUP_REQUESTS = 30


def _request(rng: random.Random, rid: str) -> bytes:
    body: dict[str, object] = {"id": rid, "prompt": rng.choice(["hi", "weather?", "你好"])}
    body["max_new_tokens"] = rng.randint(7, 10) if rng.random() < 0.05 else rng.randint(1, 6)
    body["stream"] = rng.random() < 0.5
    if rng.random() < 0.3:
        body["session"] = rng.choice(["kitchen", "garage"])
    if rng.random() < 0.03:
        body["prompt"] = ""  # invalid: answered with invalid_request
    return json.dumps(body).encode()


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    verdict = Verdict()
    tag = f"{args.seed}-{rng.randrange(1 << 16):04x}"
    with Workdir(args.keep) as workdir, PersistentMosquitto(workdir) as broker:
        daemon = FaultDaemon(
            workdir,
            broker.port,
            spec=BASE_SPEC,
            limits={"request_timeout_s": 3.0, "hang_grace_s": 1.0, "queue_size": 8, "shutdown_grace_s": 1.0},
            runtime={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0},
        )
        rec = Recorder(broker.port, daemon.root, "soak").start()
        sent: list[str] = []
        broker_restarts = 0
        rotations = 0
        with daemon:
            wait_ready(rec, daemon)
            for i in range(WARMUP_REQUESTS):
                rid = f"warm-{tag}-{i}"
                rec.publish(f"{daemon.root}/prompt", _request(rng, rid)).wait_for_publish(30)
                sent.append(rid)
            rec.wait_answered(set(sent), stall_s=30, cap_s=120)
            time.sleep(2.0)
            rss_start, fds_start = rss_kb(daemon.pid), fd_count(daemon.pid)
            started = time.monotonic()
            end = started + args.minutes * 60
            next_broker = started + args.broker_every_s
            next_rotate = started + args.rotate_s
            n = 0
            while time.monotonic() < end and daemon.running():
                now = time.monotonic()
                if now >= next_rotate:
                    rotations += 1
                    fault = FAULTS[rotations % len(FAULTS)]
                    daemon.set_spec(",".join(p for p in (BASE_SPEC, fault) if p))
                    daemon.kill_worker()
                    next_rotate = now + args.rotate_s
                if now >= next_broker:
                    broker_restarts += 1
                    say(f"  broker restart {broker_restarts} after {now - started:.0f} s; {len(sent)} sent")
                    broker.restart()
                    next_broker = time.monotonic() + args.broker_every_s
                n += 1
                rid = f"soak-{tag}-{n:06d}"
                info = rec.publish(f"{daemon.root}/prompt", _request(rng, rid))
                sent.append(rid)
                if rng.random() < 0.05:
                    target = rng.choice(sent[-5:])
                    rec.publish(f"{daemon.root}/abort", target.encode())
                if rec.connected.is_set():
                    info.wait_for_publish(30)
                _pace(rec, sent, 6, stall_s=30.0)
                time.sleep(rng.random() * args.gap_s)
            rec.wait_answered(set(sent), stall_s=args.drain_s, cap_s=600)
            time.sleep(3.0)
            alive = daemon.running()
            rss_end = rss_kb(daemon.pid) if alive else 0
            fds_end = fd_count(daemon.pid) if alive else 0
            restarts = sum(1 for e in daemon.logs() if e.get("event") == "runtime_worker_started") - 1
            exceptions = [e.get("event") for e in daemon.logs() if e.get("exception")]
        rec.stop()
        book = rec.book
        lost = [r for r in sent if r not in book.finals]
        twice = book.twice()
        say(f"soak: {args.minutes:g} min, {len(sent)} requests, {broker_restarts} broker restarts, {rotations} faults")
        say(f"  worker restarts: {restarts}; finals: {dict(sorted(book.final_states.items()))}")
        say(f"  transport redeliveries (same bytes twice): {book.redelivered()}")
        say(f"  retained copies sent again on re-subscribing (not counted above): {book.retained_copies}")
        say(f"  daemon RSS {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MB; open fds {fds_start} -> {fds_end}")
        say(f"  daemon log lines with an exception: {len(exceptions)} {exceptions[:5]}")
        verdict.check(alive, "daemon alive at the end")
        verdict.check(not lost, f"lost (no final): {len(lost)} {lost[:5]}")
        verdict.check(not twice, f"answered twice: {len(twice)} {twice[:5]}")
        verdict.check(rss_end - rss_start < args.rss_mb * 1024, f"RSS growth {(rss_end - rss_start) / 1024:.1f} MB")
        verdict.check(fds_end <= fds_start, f"fd growth {fds_end - fds_start}")
    return verdict.exit_code()


def _pace(rec: Recorder, sent: list[str], window: int, stall_s: float) -> None:
    deadline = time.monotonic() + stall_s
    with rec.cond:
        while True:
            pending = sum(1 for r in sent[-(window * 4) :] if r not in rec.book.finals)
            if pending < window or time.monotonic() >= deadline:
                return
            rec.cond.wait(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--broker-every-s", type=float, default=180.0)
    parser.add_argument("--rotate-s", type=float, default=60.0)
    parser.add_argument("--gap-s", type=float, default=0.2, help="largest random pause between two requests")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--drain-s", type=float, default=60.0)
    parser.add_argument("--rss-mb", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true")
    stop_on_sigterm()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
