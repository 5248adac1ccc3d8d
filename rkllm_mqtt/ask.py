"""``rkllm-mqtt ask``: publish one request and stream the answer to stdout.

Exit codes: 0 the answer is done; 1 the bridge answered with an error, abort or timeout;
2 no answer in time (the bridge is probably not running); 3 the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import ReplyTopics, Topics

EXIT_ERROR = 1
EXIT_NO_ANSWER = 2
EXIT_UNREACHABLE = 3
CONNECT_TIMEOUT_S = 3.0
DEFAULT_TIMEOUT_S = 300.0


class _Session:
    """What arrives for one request, collected on paho's thread and read on the main thread."""

    def __init__(self, reply: ReplyTopics, request_id: str, availability_topic: str, *, print_stream: bool) -> None:
        self.reply = reply
        self.availability_topic = availability_topic
        self.request_id = request_id
        self.print_stream = print_stream
        self.printed = ""
        self.final: dict[str, Any] | None = None
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.availability: str | None = None

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(message.payload) if message.payload else {}
        except ValueError:
            data = {}
        # Check every topic: some brokers (amqtt) send unrelated retained messages to a new subscription.
        if message.topic == self.availability_topic:
            self.availability = message.payload.decode("utf-8", errors="replace")
        elif message.topic == self.reply.stream and data.get("id") == self.request_id:
            text = str(data.get("text", ""))
            self.printed += text
            if self.print_stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        elif message.topic == self.reply.final and data.get("id") == self.request_id:
            self.final = data
            self.done.set()


def _connect(host: str, port: int, settings: Settings, v5: bool, session: _Session) -> mqtt.Client | None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"rkllm-ask-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    password = settings.mqtt.resolved_password()
    if settings.mqtt.username is not None or password is not None:
        client.username_pw_set(settings.mqtt.username, password.get_secret_value() if password else None)
    if settings.mqtt.uses_tls:
        client.tls_set(ca_certs=str(settings.mqtt.tls_ca_file) if settings.mqtt.tls_ca_file else None)
        client.tls_insecure_set(settings.mqtt.tls_insecure)
    connected = threading.Event()
    outcome: dict[str, bool] = {}

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome["ok"] = not reason.is_failure
        connected.set()

    client.on_connect = on_connect
    client.on_message = session.on_message
    client.on_subscribe = lambda *args: session.subscribed.set()
    try:
        client.connect(host, port, settings.mqtt.keepalive_s)
    except OSError as exc:
        print(f"rkllm-mqtt ask: cannot reach the broker at {host}:{port}: {exc}", file=sys.stderr)
        return None
    client.loop_start()
    if connected.wait(CONNECT_TIMEOUT_S) and outcome.get("ok"):
        return client
    client.loop_stop()
    client.disconnect()
    return None


def ask(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.mqtt.host or "127.0.0.1"
    port = args.port or settings.mqtt.port
    topics = Topics(args.base or settings.mqtt.base_topic, args.node or settings.mqtt.node_id)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request_id = f"ask-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"id": request_id, "prompt": prompt}
    if args.session:
        body["session"] = args.session
    if args.system:
        body["system"] = args.system
    if args.max_new_tokens:
        body["max_new_tokens"] = args.max_new_tokens
    timeout = args.timeout or DEFAULT_TIMEOUT_S
    if args.timeout:
        body["timeout_s"] = args.timeout

    want_v5 = settings.mqtt.protocol != "3.1.1" and not (settings.mqtt.host is None and args.host is None)
    prefixes = settings.reply_prefixes()
    reply_v5 = ReplyTopics(f"{prefixes[0]}/{request_id}") if prefixes else ReplyTopics(topics.response(request_id))
    client: mqtt.Client | None = None
    reply = reply_v5
    session = _Session(reply, request_id, topics.availability, print_stream=not args.json)
    if want_v5:
        client = _connect(host, port, settings, True, session)
    if client is None:
        reply = ReplyTopics(topics.response(request_id))
        session = _Session(reply, request_id, topics.availability, print_stream=not args.json)
        client = _connect(host, port, settings, False, session)
    if client is None:
        print(f"rkllm-mqtt ask: could not connect to the broker at {host}:{port}", file=sys.stderr)
        return EXIT_UNREACHABLE
    v5 = client.protocol == mqtt.MQTTv5
    client.subscribe([(reply.final, 1), (reply.stream, 1), (topics.availability, 1)])
    session.subscribed.wait(CONNECT_TIMEOUT_S)
    properties = None
    if v5:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = reply.final
        properties.CorrelationData = request_id.encode()
    client.publish(topics.prompt, json.dumps(body).encode(), qos=1, properties=properties).wait_for_publish(
        CONNECT_TIMEOUT_S
    )
    answered = session.done.wait(timeout + 10.0)
    client.loop_stop()
    client.disconnect()
    if not answered or session.final is None:
        state = session.availability or "unknown"
        print(
            f"\nrkllm-mqtt ask: no answer within {timeout + 10.0:.0f} s on {reply.final} "
            f"(bridge {topics.root} availability: {state})",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    final = session.final
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
        print(
            f"rkllm-mqtt ask: {final.get('state')}: {error.get('code', '')}: {error.get('message', '')}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0
