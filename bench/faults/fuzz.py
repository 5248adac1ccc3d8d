"""Fuzz: random and mutated payloads on the prompt, abort and clear topics while the runtime crashes, hangs and fails.

``python -m bench.faults.fuzz [--payloads 5000] [--seed N] [--rotate 500]``

One daemon on the simulated runtime, a private Mosquitto, and a stream of payloads: valid requests, mutations of
them (flipped, cut, inserted bytes; wrong types; unknown fields; oversized prompts; invalid UTF-8; deep nesting),
plain text, and junk on ``abort`` and ``clear``. The simulated model is a file whose spec changes every
``--rotate`` payloads (crash at token 7, hang at token 7, error at token 7, no fault); the worker is SIGKILLed
at each change so the next one loads it. Requests ask for 1-10 tokens, so some reach the fault and most do not.

Invariants (exit status 1 when one fails): the daemon never exits; every request it queued gets a final; no
request id gets two different finals; every payload with an id the daemon accepts gets a final or an error event.
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
    daemon_id_of,
    say,
    stop_on_sigterm,
    wait_ready,
)

BASE_SPEC = "tokens=10,rate=200,prefill_ms=0"
FAULTS = ("crash_at=7", "hang_at=7", "error_at=7", "")
MAX_PROMPT_BYTES = 2048
WINDOW = 6  # requests with an id in flight before the fuzzer waits: keeps faults between requests, not a flood
JUNK_VALUES: tuple[object, ...] = (None, True, -1, 0, 1e308, "", "x" * 300, [], {}, [1, 2], {"a": 1}, "\u0000", "🙂")
FIELDS = ("prompt", "id", "system", "session", "max_new_tokens", "temperature", "top_k", "top_p")
FIELDS_MORE = ("repeat_penalty", "stream", "timeout_s", "response_topic")


class Generator:
    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.count = 0

    def next_id(self) -> str:
        self.count += 1
        return f"fz-{self.tag}-{self.count:06d}"

    def valid(self) -> dict[str, object]:
        rng = self.rng
        body: dict[str, object] = {
            "id": self.next_id(),
            "prompt": rng.choice(["hi", "tell me", "你好", "🙂 ok", "a b c"]),
        }
        # Mostly short: about one request in twenty reaches token 7, where the fault is.
        body["max_new_tokens"] = rng.randint(7, 10) if rng.random() < 0.05 else rng.randint(1, 6)
        if rng.random() < 0.5:
            body["stream"] = rng.random() < 0.5
        if rng.random() < 0.3:
            body["session"] = rng.choice(["kitchen", "garage", "s-" + str(rng.randint(0, 5))])
        if rng.random() < 0.1:
            body["system"] = "be brief"
        if rng.random() < 0.1:
            body["timeout_s"] = rng.choice([0.5, 2.0, 30.0])
        if rng.random() < 0.1:
            body["temperature"] = rng.choice([0.0, 0.7, 1.5])
        return body

    def mutated(self) -> bytes:
        rng = self.rng
        body = self.valid()
        kind = rng.randrange(12)
        if kind == 0:  # a field gets a value of another type
            body[rng.choice(FIELDS + FIELDS_MORE)] = rng.choice(JUNK_VALUES)
        elif kind == 1:  # an unknown field
            body[rng.choice(["promt", "ID", "extra", ""])] = 1
        elif kind == 2:  # a field goes missing
            body.pop(rng.choice(["prompt", "id"]), None)
        elif kind == 3:  # oversized prompt
            body["prompt"] = "x" * (MAX_PROMPT_BYTES + rng.randint(1, 5000))
        elif kind == 4:  # reply topics the daemon must refuse
            body["response_topic"] = rng.choice(["#", "a/+/b", "$SYS/x", "rkllm", "homeassistant/x", "", "\u0000"])
        elif kind == 5:  # numbers at their edges
            body[rng.choice(["max_new_tokens", "top_k", "timeout_s", "top_p"])] = rng.choice(
                [0, -5, 2**63, 1e-300, 10**400]
            )
        data = json.dumps(body).encode()
        if kind == 6:  # bytes flipped
            raw = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            data = bytes(raw)
        elif kind == 7:  # cut short
            data = data[: rng.randrange(len(data))]
        elif kind == 8:  # bytes inserted
            at = rng.randrange(len(data))
            data = data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]
        elif kind == 9:  # invalid UTF-8 inside a string
            data = data.replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)
        elif kind == 10:  # deep nesting
            depth = rng.choice([100, 10_000, 100_000])
            data = b'{"id": "' + str(body["id"]).encode() + b'", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        return data

    def prompt_payload(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.30:
            return json.dumps(self.valid()).encode()
        if roll < 0.85:
            return self.mutated()
        if roll < 0.92:  # plain text prompts (the daemon makes an id up)
            return rng.choice([b"hello", b"   ", b"", "ünïcode".encode(), b"x" * (MAX_PROMPT_BYTES + 1)])
        return rng.choice([b"[]", b"null", b"42", b'"str"', b"{", b"{}", rng.randbytes(rng.randint(1, 200))])

    def control_payload(self, known: list[str]) -> bytes:
        rng = self.rng
        choices = [b"", b"nope", rng.randbytes(rng.randint(1, 64)), b"x" * 5000, b"\xff"]
        if known:
            choices.append(rng.choice(known).encode())
        return rng.choice(choices)


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    gen = Generator(rng, f"{args.seed}")
    verdict = Verdict()
    with Workdir(args.keep) as workdir, PersistentMosquitto(workdir) as broker:
        daemon = FaultDaemon(
            workdir,
            broker.port,
            spec=BASE_SPEC,
            limits={
                "max_prompt_bytes": MAX_PROMPT_BYTES,
                "request_timeout_s": 3.0,
                "hang_grace_s": 1.0,
                "queue_size": 8,
                "shutdown_grace_s": 1.0,
            },
            runtime={"restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0},
        )
        rec = Recorder(broker.port, daemon.root, "fuzz").start()
        daemon_exits = 0
        sent_ids: dict[str, int] = {}
        sent = {"prompt": 0, "abort": 0, "clear": 0}
        faults_seen: dict[str, int] = {}
        started = time.monotonic()
        with daemon:
            wait_ready(rec, daemon)
            for i in range(args.payloads):
                if i % args.rotate == 0:
                    fault = FAULTS[(i // args.rotate) % len(FAULTS)]
                    daemon.set_spec(",".join(p for p in (BASE_SPEC, fault) if p))
                    if i > 0:
                        daemon.kill_worker()
                    faults_seen[fault or "none"] = faults_seen.get(fault or "none", 0) + 1
                if not daemon.running():
                    daemon_exits += 1
                    say(f"daemon exited (status {daemon.proc.returncode if daemon.proc else '?'}); restarting it")
                    say(daemon.log_tail(30))
                    daemon.proc = None
                    daemon.__enter__()
                    wait_ready(rec, daemon)
                roll = rng.random()
                if roll < 0.8:
                    topic, payload, kind = f"{daemon.root}/prompt", gen.prompt_payload(), "prompt"
                    rid = daemon_id_of(payload)
                    if rid is not None:
                        sent_ids[rid] = sent_ids.get(rid, 0) + 1
                elif roll < 0.9:
                    topic, kind = f"{daemon.root}/abort", "abort"
                    payload = gen.control_payload(list(sent_ids)[-5:])
                else:
                    topic, kind = f"{daemon.root}/clear", "clear"
                    payload = gen.control_payload(["kitchen", "garage"])
                rec.publish(topic, payload, qos=rng.choice([0, 1])).wait_for_publish(30)
                sent[kind] += 1
                _pace(rec, sent_ids, WINDOW, stall_s=30.0)
                if (i + 1) % 500 == 0:
                    with rec.cond:
                        finals = len(rec.book.finals)
                    say(f"  {i + 1} payloads, {finals} finals, {time.monotonic() - started:.0f} s")
            with rec.cond:
                expected = set(rec.book.queued) | {r for r in sent_ids if r not in rec.book.error_ids}
            rec.wait_answered(expected, stall_s=args.drain_s, cap_s=600.0)
            alive_at_end = daemon.running()
            restarts = sum(1 for e in daemon.logs() if e.get("event") == "runtime_worker_started") - 1
            logged = {name: 0 for name in ("runtime_crashed", "runtime_hung", "runtime_error")}
            for event in daemon.logs():
                if event.get("event") == "request_done" and event.get("state") == "error":
                    pass
                code = event.get("code")
                if isinstance(code, str) and code in logged:
                    logged[code] += 1
            exceptions = [e.get("event") for e in daemon.logs() if e.get("exception") or e.get("level") == "critical"]
        rec.stop()
        book = rec.book
        unanswered = sorted(rid for rid in book.queued if rid not in book.finals)
        silent = sorted(rid for rid in sent_ids if rid not in book.finals and rid not in book.error_ids)
        twice = book.twice()
        say(f"fuzz: {sum(sent.values())} payloads in {time.monotonic() - started:.0f} s, seed {args.seed}")
        say(f"  sent: {sent}; ids the daemon could read: {len(sent_ids)}")
        say(f"  fault phases: {faults_seen}; worker restarts: {restarts}")
        say(f"  queued: {len(book.queued)}; finals: {len(book.finals)} {dict(sorted(book.final_states.items()))}")
        say(f"  error events: {len(book.error_ids)} with id, {book.errors_anonymous} without")
        say(f"  transport redeliveries (same bytes twice): {book.redelivered()}")
        say(f"  daemon log lines with an exception: {len(exceptions)} {exceptions[:5]}")
        verdict.check(daemon_exits == 0 and alive_at_end, f"daemon exits: {daemon_exits + (0 if alive_at_end else 1)}")
        verdict.check(not unanswered, f"queued and never answered: {len(unanswered)} {unanswered[:5]}")
        verdict.check(not twice, f"two different finals: {len(twice)} {twice[:5]}")
        verdict.check(not silent, f"readable id, neither final nor error: {len(silent)} {silent[:5]}")
        verdict.check(not exceptions, f"exceptions logged: {len(exceptions)}")
    return verdict.exit_code()


def _pace(rec: Recorder, sent_ids: dict[str, int], window: int, stall_s: float) -> None:
    """Wait while ``window`` requests are without an answer (or nothing has been heard for ``stall_s``)."""
    deadline = time.monotonic() + stall_s
    with rec.cond:
        while True:
            book = rec.book
            recent = list(sent_ids)[-(window * 4) :]
            pending = sum(1 for r in recent if r not in book.finals and r not in book.error_ids)
            if pending < window or time.monotonic() >= deadline:
                return
            rec.cond.wait(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--payloads", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--rotate", type=int, default=500, help="payloads between changes of the runtime's fault")
    parser.add_argument("--drain-s", type=float, default=60.0, help="silence after which the unanswered are counted")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    stop_on_sigterm()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
