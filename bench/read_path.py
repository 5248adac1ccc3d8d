"""What reading one prompt from the broker costs the network thread: ``python -m bench.read_path [--count N]``.

The transport's paho client reads ``count`` PUBLISH packets (a small JSON prompt each, as a flood sends them) from
a local socket and hands each on as the bridge's ``IncomingMessage``, on this thread alone: no broker, no
dispatcher, nothing else wants the interpreter lock. Printed: the thread's CPU time per message, for paho decoding
every packet and for the transport's own PUBLISH reader (rkllm_mqtt.bridge.publish_reader), and their ratio. QoS 0
packets without properties, and QoS 1 packets carrying MQTT 5 properties (a response topic and correlation data),
the two kinds a flood brings.

Not part of ``python -m bench``: it measures one function of the transport, in isolation.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.publish_reader import encode_length
from rkllm_mqtt.bridge.transport import IncomingMessage, MqttTransport, _BufferedReads, _Client
from rkllm_mqtt.settings import MqttSettings


def _packets(count: int, qos: int) -> bytes:
    topic = b"rkllm/board/prompt"
    properties = Properties(PacketTypes.PUBLISH)
    if qos:
        properties.ResponseTopic = "devices/kitchen/answer"
        properties.CorrelationData = b"0123456789abcdef"
    packed = properties.pack()
    frames = []
    for index in range(count):
        payload = json.dumps({"id": f"fl-{index:06d}", "prompt": "f", "stream": False}).encode()
        body = len(topic).to_bytes(2, "big") + topic
        if qos:
            body += (index % 65535 + 1).to_bytes(2, "big")
        body += packed + payload
        frames.append(bytes([0x30 | (qos << 1)]) + encode_length(len(body)) + body)
    return b"".join(frames)


def measure(count: int, qos: int, *, fast: bool) -> float:
    """CPU seconds of the reading thread per message."""
    received: list[IncomingMessage] = []
    transport = MqttTransport(
        MqttSettings(client_id="read-path"),
        host="127.0.0.1",
        availability_topic=None,
        subscriptions=[],
        on_message=received.append,
        on_connected=lambda: None,
        force_protocol="5",
        manual_ack=True,
    )
    client = transport._build_client()
    assert isinstance(client, _Client)
    if not fast:
        client.fast_publish = None
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = _BufferedReads(ours)
    data = _packets(count, qos)
    writer = threading.Thread(target=theirs.sendall, args=(data,), daemon=True)
    writer.start()
    started = time.thread_time()
    try:
        while len(received) < count:
            client.loop_read()
        return (time.thread_time() - started) / count
    finally:
        writer.join(10)
        ours.close()
        theirs.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3, help="the best of this many runs is printed")
    args = parser.parse_args(argv)
    for qos in (0, 1):
        paho = min(measure(args.count, qos, fast=False) for _ in range(args.rounds))
        reader = min(measure(args.count, qos, fast=True) for _ in range(args.rounds))
        label = "QoS 0, no properties" if qos == 0 else "QoS 1, response topic + correlation data"
        figures = f"paho {paho * 1e6:6.1f} us/msg   reader {reader * 1e6:6.1f} us/msg   ratio {paho / reader:.1f}x"
        print(f"{label:45s} {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
