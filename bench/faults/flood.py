"""Flood: tens of thousands of prompts as fast as a client can publish them, at QoS 0 and then at QoS 1.

``python -m bench.faults.flood [--count 50000] [--qos 0 1]``

For each QoS: the daemon's resident memory while idle; the flood (``--count`` small JSON requests with ids,
published back to back by one client); a probe request published by another client as soon as the flood is out
of the first; how long the probe's client waits for its final, on its own reply topic, and when the daemon made
that final; how many flood requests got a final (and which codes); the daemon's ``mqtt_publish_failed`` log
lines; its memory right after and once everything went quiet.

Invariants (exit status 1 when one fails): the probe is answered within ``--probe-s`` (2 s) of the flood's end;
every flood request that reached the daemon gets a final; memory returns to idle + ``--rss-mb`` (10 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import (
    FaultDaemon,
    PersistentMosquitto,
    Recorder,
    Verdict,
    Workdir,
    rss_kb,
    say,
    stop_on_sigterm,
    wait_ready,
)
from bench.procs import LOOPBACK

SPEC = "tokens=4,rate=0,prefill_ms=0"


def _publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(20)  # Mosquitto's receive maximum
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(LOOPBACK, port, 60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("the flood client could not connect")
    return client


class _Asker:
    """Another device: subscribed to its own reply topic only, it sends one request after the flood and waits for
    its final. (The recorder sees every final of the flood and would report when it got through its backlog.)"""

    def __init__(self, port: int, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self.final: bytes | None = None
        self.answered = threading.Event()
        self.client = _publisher(port)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.subscribe(reply_topic, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the asking client could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.reply_topic and self.final is None:
            self.final = bytes(message.payload)
            self.answered.set()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _settle_rss(pid: int, quiet_s: float) -> int:
    """RSS once it stopped moving: sampled every second until ``quiet_s`` seconds gave the same value ±256 kB."""
    last = rss_kb(pid)
    steady_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss_kb(pid)
        if abs(now - last) > 256:
            steady_since = time.monotonic()
        last = now
        if time.monotonic() - steady_since >= quiet_s:
            break
    return last


def flood_once(daemon: FaultDaemon, rec: Recorder, qos: int, count: int, args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    ids = [f"fl{qos}-{tag}-{i:06d}" for i in range(count)]
    payloads = [json.dumps({"id": r, "prompt": "f", "stream": False, "max_new_tokens": 1}).encode() for r in ids]
    topic = f"{daemon.root}/prompt"
    failed_before = sum(1 for e in daemon.logs() if e.get("event") == "mqtt_publish_failed")
    idle_kb = _settle_rss(daemon.pid, 3.0)
    probe_id = f"probe-{tag}"
    asker = _Asker(rec.port, f"{daemon.root}/response/{probe_id}")
    client = _publisher(rec.port)
    try:
        started = time.monotonic()
        last = None
        for payload in payloads:
            last = client.publish(topic, payload, qos=qos)
        # Out of the client: a QoS 1 marker after the flood is acknowledged only once everything before it went.
        client.publish(f"{daemon.root}/flood-marker", b"", qos=1).wait_for_publish(600)
        if last is not None and qos == 1:
            last.wait_for_publish(600)
        flood_end = time.monotonic()
        flood_end_wall = time.time()
        probe = json.dumps({"id": probe_id, "prompt": "probe", "stream": False, "max_new_tokens": 1}).encode()
        asker.client.publish(topic, probe, qos=1).wait_for_publish(60)
        right_after_kb = rss_kb(daemon.pid)
        final = asker.final if asker.answered.wait(args.probe_cap_s) else None
        probe_s = time.monotonic() - flood_end if final is not None else None
        probe_state = None
        probe_made_s = None
        if final is not None:
            data = json.loads(final)
            probe_state = (data.get("error") or {}).get("code") or data.get("state")
            # When the daemon made the final (its clock is this machine's): late here means the probe reached
            # the daemon late; early, that the answer waited on its way out.
            probe_made_s = round(float(data.get("ts", 0.0)) - flood_end_wall, 2)
        peak_kb = rss_kb(daemon.pid)
        rec.wait_answered(set(ids), stall_s=args.drain_s, cap_s=900.0)
        drained = time.monotonic()
    finally:
        client.disconnect()
        client.loop_stop()
        asker.stop()
    after_kb = _settle_rss(daemon.pid, 5.0)
    with rec.cond:
        answered = [r for r in ids if r in rec.book.finals]
        codes: dict[str, int] = {}
        for r in answered:
            data = json.loads(rec.book.finals[r][0])
            key = (data.get("error") or {}).get("code") or data.get("state")
            codes[key] = codes.get(key, 0) + 1
        twice = [r for r in ids if r in rec.book.finals and len(set(rec.book.finals[r])) > 1]
    failed = sum(1 for e in daemon.logs() if e.get("event") == "mqtt_publish_failed") - failed_before
    return {
        "qos": qos,
        "count": count,
        "publish_s": round(flood_end - started, 2),
        "probe_s": round(probe_s, 2) if probe_s is not None else None,
        "probe_final": probe_state,
        "probe_final_made_s": probe_made_s,
        "answered": len(answered),
        "lost": count - len(answered),
        "twice": len(twice),
        "codes": codes,
        "drain_s": round(drained - started, 1),
        "publish_failed_lines": failed,
        "rss_idle_mb": round(idle_kb / 1024, 1),
        "rss_after_flood_mb": round(right_after_kb / 1024, 1),
        "rss_at_probe_mb": round(peak_kb / 1024, 1),
        "rss_settled_mb": round(after_kb / 1024, 1),
        "daemon_alive": daemon.running(),
    }


def run(args: argparse.Namespace) -> int:
    verdict = Verdict()
    results = []
    with Workdir(args.keep) as workdir, PersistentMosquitto(workdir) as broker:
        daemon = FaultDaemon(workdir, broker.port, spec=SPEC, limits={"queue_size": args.queue_size})
        rec = Recorder(broker.port, daemon.root, "flood").start()
        with daemon:
            wait_ready(rec, daemon)
            for qos in args.qos:
                say(f"flood of {args.count} QoS {qos} prompts ...")
                result = flood_once(daemon, rec, qos, args.count, args)
                results.append(result)
                say("  " + json.dumps(result))
                if not daemon.running():
                    break
        rec.stop()
    for r in results:
        q = r["qos"]
        probe = r["probe_s"]
        verdict.check(probe is not None and probe <= args.probe_s, f"QoS {q}: probe answered after {probe} s")
        verdict.check(r["lost"] == 0, f"QoS {q}: flood requests without a final: {r['lost']} of {r['count']}")
        verdict.check(r["twice"] == 0, f"QoS {q}: two different finals: {r['twice']}")
        grown = r["rss_settled_mb"] - r["rss_idle_mb"]
        verdict.check(grown <= args.rss_mb, f"QoS {q}: RSS {r['rss_idle_mb']} -> {r['rss_settled_mb']} MB")
        verdict.check(r["daemon_alive"], f"QoS {q}: daemon alive")
    return verdict.exit_code()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--qos", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--probe-s", type=float, default=2.0, help="the probe's allowed wait after the flood")
    parser.add_argument("--probe-cap-s", type=float, default=300.0, help="how long to wait for the probe at all")
    parser.add_argument("--drain-s", type=float, default=30.0, help="silence after which the unanswered are counted")
    parser.add_argument("--rss-mb", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true")
    stop_on_sigterm()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
