"""``rkllm-mqtt ask``: publish one request and stream the answer to stdout.

It connects as the daemon does (:mod:`rkllm_mqtt.mqtt_client`), then looks at the node's retained availability
before asking: an offline or unknown node is reported at once, with the nodes that can be seen under the base
topic, instead of waiting for an answer that cannot come. Exit codes: :mod:`rkllm_mqtt.exit_codes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt import exit_codes
from rkllm_mqtt.mqtt_client import ConnectError, connect
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import ReplyTopics, Topics

CONNECT_TIMEOUT_S = 5.0
# How long the node's retained availability may take to arrive. It normally comes in milliseconds; the wait ends
# as soon as the broker has answered a later SUBSCRIBE, which it does only after sending the retained messages.
AVAILABILITY_WAIT_S = 2.0
DEFAULT_TIMEOUT_S = 300.0
AVAILABILITY_LEVEL = "availability"


class _Session:
    """What arrives for one request, collected on paho's thread and read on the main thread."""

    def __init__(self, topics: Topics, request_id: str, *, print_stream: bool) -> None:
        self.topics = topics
        self.request_id = request_id
        self.print_stream = print_stream
        self.reply: ReplyTopics | None = None
        self.printed = ""
        # QoS 1 is at least once: after a reconnect a chunk may arrive again. Chunks carry a growing seq.
        self.last_seq = -1
        self.final: dict[str, Any] | None = None
        self.availability: dict[str, str] = {}  # node id -> its retained availability
        self.went_offline = False
        self.output_closed = False  # the reader of standard output has gone (`ask ... | head`)
        self.done = threading.Event()
        self.subacks: set[int] = set()
        self.subscribed = threading.Condition()

    def on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self.subscribed:
            self.subacks.add(mid)
            self.subscribed.notify_all()

    def wait_suback(self, mid: int, timeout: float) -> bool:
        with self.subscribed:
            return self.subscribed.wait_for(lambda: mid in self.subacks, timeout)

    def _node_of(self, topic: str) -> str | None:
        levels = topic.split("/")
        base = self.topics.base.split("/")
        if len(levels) == len(base) + 2 and levels[: len(base)] == base and levels[-1] == AVAILABILITY_LEVEL:
            return levels[len(base)]
        return None

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        node = self._node_of(message.topic)
        if node is not None:
            state = message.payload.decode("utf-8", errors="replace").strip()
            self.availability[node] = state
            if node == self.topics.node and state == "offline" and self.reply is not None:
                self.went_offline = True  # the bridge stopped (or died) while we wait: no answer will come
                self.done.set()
            return
        reply = self.reply
        if reply is None:
            return
        try:
            data = json.loads(message.payload) if message.payload else {}
        except ValueError:
            return
        if not isinstance(data, dict) or data.get("id") != self.request_id:
            return
        if message.topic == reply.stream:
            seq = data.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    return  # a repeat of a chunk already printed
                self.last_seq = seq
            text = str(data.get("text", ""))
            self.printed += text
            if self.print_stream and not self.output_closed:
                try:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                except BrokenPipeError:
                    # Raised into paho's thread it would end the loop, and the wait below would last --timeout.
                    self.output_closed = True
                    self.done.set()
        elif message.topic == reply.final:
            self.final = data
            self.done.set()


def _request(args: argparse.Namespace, request_id: str) -> dict[str, Any]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    body: dict[str, Any] = {"id": request_id, "prompt": prompt}
    if args.session:
        body["session"] = args.session
    if args.system:
        body["system"] = args.system
    if args.max_new_tokens:
        body["max_new_tokens"] = args.max_new_tokens
    if args.timeout:
        body["timeout_s"] = args.timeout
    return body


def _seen(session: _Session) -> str:
    nodes = sorted(session.availability.items())
    if not nodes:
        return f"no node has a retained availability under {session.topics.base}/ on this broker"
    listed = ", ".join(f"{node} ({state})" for node, state in nodes)
    return f"nodes under {session.topics.base}/: {listed}"


def _fail(message: str, code: int) -> int:
    print(f"rkllm-mqtt ask: {message}", file=sys.stderr)
    return code


def ask(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.mqtt.host or "127.0.0.1"
    port = args.port or settings.mqtt.port
    topics = Topics(args.base or settings.mqtt.base_topic, args.node or settings.mqtt.node_id)
    request_id = f"ask-{uuid.uuid4().hex[:12]}"
    body = _request(args, request_id)
    timeout = args.timeout or DEFAULT_TIMEOUT_S
    session = _Session(topics, request_id, print_stream=not args.json)
    try:
        connection = connect(
            settings.mqtt,
            host=host,
            port=port,
            embedded=settings.mqtt.host is None and args.host is None,
            client_id=f"rkllm-ask-{uuid.uuid4().hex[:8]}",
            timeout=CONNECT_TIMEOUT_S,
            on_message=session.on_message,
        )
    except ConnectError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        return _fail(f"{exc.detail}{hint}", exit_codes.BROKER_UNREACHABLE)
    client = connection.client
    v5 = connection.protocol == "5"
    prefixes = settings.reply_prefixes()
    # MQTT 5 carries the reply topic as a property; 3.1.1 uses the node's default response topic.
    reply = ReplyTopics(f"{prefixes[0]}/{request_id}") if v5 and prefixes else ReplyTopics(topics.response(request_id))
    client.on_subscribe = session.on_subscribe
    client.loop_start()
    try:
        client.subscribe(f"{topics.base}/+/{AVAILABILITY_LEVEL}", 1)
        # Answered only after the retained availabilities above were sent: the barrier for reading them.
        _rc, barrier = client.subscribe([(reply.final, 1), (reply.stream, 1)])
        if barrier is None:
            return _fail(f"lost the connection to the broker at {host}:{port}", exit_codes.BROKER_UNREACHABLE)
        session.wait_suback(barrier, AVAILABILITY_WAIT_S)
        state = session.availability.get(topics.node)
        if state is None:
            return _fail(
                f"node {topics.node!r} is unknown: nothing retained on {topics.availability}; {_seen(session)} "
                "(is rkllm-mqtt serve running there? check --node, --base, --host)",
                exit_codes.NODE_OFFLINE,
            )
        if state != "online":
            return _fail(
                f"node {topics.node!r} is {state} ({topics.availability}); {_seen(session)}",
                exit_codes.NODE_OFFLINE,
            )
        session.reply = reply
        properties = None
        if v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply.final
            properties.CorrelationData = request_id.encode()
        client.publish(topics.prompt, json.dumps(body).encode(), qos=1, properties=properties)
        answered = session.done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if session.output_closed:
        return _output_closed()
    if session.final is None:
        if session.went_offline:
            return _fail(f"\nnode {topics.node!r} went offline before answering", exit_codes.NODE_OFFLINE)
        reason = "no answer" if not answered else "no final answer"
        return _fail(f"\n{reason} within {timeout:g} s on {reply.final}", exit_codes.NO_ANSWER)
    try:
        return _print_final(session, args)
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """The reader of standard output has gone: stop quietly, as other commands in a pipe do."""
    # What is still buffered would fail again when the interpreter flushes it at exit, with a message on stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return exit_codes.OUTPUT_CLOSED


def _print_final(session: _Session, args: argparse.Namespace) -> int:
    final = session.final or {}
    if args.json:
        print(json.dumps(final, indent=2, ensure_ascii=False))
    else:
        text = str(final.get("text", ""))
        if text.startswith(session.printed):
            sys.stdout.write(text[len(session.printed) :])
        sys.stdout.write("\n")
    sys.stdout.flush()
    if final.get("state") != "done":
        error = final.get("error") or {}
        return _fail(
            f"{final.get('state')}: {error.get('code', '')}: {error.get('message', '')}", exit_codes.REQUEST_FAILED
        )
    return exit_codes.OK
