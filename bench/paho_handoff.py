"""What publishing one token with paho costs: ``python -m bench.paho_handoff [--rate R] [--count N]``.

A producer thread here plays the run loop: it sleeps in ``poll()`` on a pipe that a child process writes one byte to
``rate`` times a second (the worker's token) and publishes one QoS 1 message per byte to a private Mosquitto. The
CPU time of this process per message is measured two ways:

- ``threaded``: paho's ``loop_start()``, as the bridge's transport does: ``publish()`` queues the packet and wakes
  paho's network thread through its socket pair; that thread writes it and later reads the PUBACK;
- ``threaded, QoS 0``: the same without PUBACKs;
- ``no publish``: the producer alone (its own wake-up per tick);
- ``direct``: no paho thread: ``publish()`` writes the packet on the producer's thread (paho does that when no loop
  thread runs), and a thread of our own sleeps in ``select()`` on the socket only to read PUBACKs (and to write
  what a full socket left queued). One lock serialises every call into paho.

Not part of ``python -m bench``: it measures a design the transport does not use (yet).
"""

from __future__ import annotations

import argparse
import select
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.procs import Mosquitto
from bench.wakeup import ticker


def _client(port: int, name: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port, keepalive=60)
    return client


def _produce(publish: Callable[[bytes], object], rate: float, count: int) -> float:
    """Publish one message per tick; returns this process's CPU time per message in microseconds."""
    with ticker(1 / rate, count) as wakeups:
        started = time.process_time_ns()
        sent = 0
        for ticks in wakeups:
            for _ in range(ticks):
                publish(f"bench/handoff/{sent}".encode())
                sent += 1
        used = time.process_time_ns() - started
    return used / max(sent, 1) / 1000


def threaded(port: int, rate: float, count: int, qos: int = 1) -> float:
    client = _client(port, f"handoff-threaded-{qos}")
    client.loop_start()
    try:
        return _produce(lambda payload: client.publish("bench/handoff", payload, qos=qos), rate, count)
    finally:
        client.loop_stop()
        client.disconnect()


def direct(port: int, rate: float, count: int) -> float:
    client = _client(port, "handoff-direct")
    lock = threading.Lock()
    stop = threading.Event()
    with lock:
        while not client.is_connected():  # CONNACK
            client.loop_read()
            time.sleep(0.01)

    def network() -> None:
        sock = client.socket()
        assert sock is not None
        while not stop.is_set():
            writable = [sock] if client.want_write() else []
            readable, can_write, _ = select.select([sock], writable, [], 1.0)
            with lock:
                if readable:
                    client.loop_read()
                if can_write:
                    client.loop_write()
                client.loop_misc()

    thread = threading.Thread(target=network, daemon=True)
    thread.start()

    def publish(payload: bytes) -> None:
        with lock:
            client.publish("bench/handoff", payload, qos=1)

    try:
        return _produce(publish, rate, count)
    finally:
        stop.set()
        thread.join(2)
        client.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paho_handoff", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rkllm-handoff-") as tmp, Mosquitto(Path(tmp)) as broker:
        runs: dict[str, Callable[[], float]] = {
            "threaded, QoS 1": lambda: threaded(broker.port, args.rate, args.count),
            "direct, QoS 1": lambda: direct(broker.port, args.rate, args.count),
            "threaded, QoS 0": lambda: threaded(broker.port, args.rate, args.count, qos=0),
            "no publish": lambda: _produce(lambda payload: None, args.rate, args.count),
        }
        for _ in range(2):
            for name, run in runs.items():
                print(f"{name:>16}: {run():.1f} us of CPU per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
