"""Window: does the broker keep to the Receive Maximum of a client that holds its acknowledgements?

``python -m bench.faults.window [--receive-max 3] [--acks 8]``

The daemon acknowledges a prompt only once it is settled, so it may hold acknowledgements for a long time and
relies on the broker to send no more than its Receive Maximum of unacknowledged messages (docs/reliability.md).
This starts a private Mosquitto, connects an MQTT 5 client with ``manual_ack`` and the given Receive Maximum,
publishes 200 QoS 1 messages to it, then acknowledges them one at a time, in order, and prints how many arrived
unacknowledged after each step. Exit status 1 when the broker ever exceeds the window.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import PersistentMosquitto, Verdict, Workdir, say, stop_on_sigterm
from bench.procs import LOOPBACK
from bench.sysinfo import mosquitto_version

SETTLE_S = 0.3  # how long the broker gets to send what an acknowledgement allows (a figure, not an assertion)


def run(args: argparse.Namespace) -> int:
    verdict = Verdict()
    with Workdir(False) as workdir, PersistentMosquitto(workdir) as broker:
        received: list[int] = []
        lock = threading.Lock()

        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            with lock:
                received.append(message.mid)

        holder = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"window-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        holder.on_message = on_message
        subscribed = threading.Event()
        holder.on_subscribe = lambda *a: subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = args.receive_max
        holder.connect(LOOPBACK, broker.port, 30, clean_start=True, properties=props)
        holder.loop_start()
        holder.subscribe("window/test", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")
        sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sender.connect(LOOPBACK, broker.port, 30)
        sender.loop_start()
        for _ in range(200):
            sender.publish("window/test", b"x", qos=1).wait_for_publish(10)
        time.sleep(SETTLE_S)
        worst = 0
        with lock:
            say(
                f"mosquitto {mosquitto_version()}: receive maximum {args.receive_max}, nothing acknowledged: "
                f"{len(received)} received"
            )
            worst = len(received)
        for acked in range(1, args.acks + 1):
            with lock:
                mid = received[acked - 1]
            holder.ack(mid, 1)
            time.sleep(SETTLE_S)
            with lock:
                unacked = len(received) - acked
            worst = max(worst, unacked)
            say(f"  after {acked} acknowledgement(s) in order: {unacked} unacknowledged")
        sender.disconnect()
        sender.loop_stop()
        holder.disconnect()
        holder.loop_stop()
        verdict.check(worst <= args.receive_max, f"most unacknowledged at once: {worst} (window {args.receive_max})")
    return verdict.exit_code()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--receive-max", type=int, default=3)
    parser.add_argument("--acks", type=int, default=8)
    stop_on_sigterm()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
