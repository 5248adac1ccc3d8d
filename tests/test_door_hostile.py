"""The MQTT door facing hostile input, without a broker: a recording transport, the real scheduler, the fake runtime.

Validation itself is tested in test_requests.py; these tests show the door uses it everywhere input arrives:
abort and clear payloads, the limits from the settings, and the group hand-off of a request with an MQTT 5
Response Topic property the broker would refuse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rkllm_mqtt.bridge.door import MqttDoor
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.core.scheduler import Scheduler
from rkllm_mqtt.settings import Settings

from .fakes import WAIT_S, FakeRuntime
from .test_door import NODE, ROOT, RecordingTransport


@dataclass
class Door:
    door: MqttDoor
    scheduler: Scheduler
    runtime: FakeRuntime
    transport: RecordingTransport

    def send(self, topic: str, payload: bytes | str, **fields: Any) -> None:
        raw = payload.encode() if isinstance(payload, str) else payload
        self.door._handle(IncomingMessage(topic=topic, payload=raw, retain=False, **fields))

    def errors(self) -> list[Any]:
        return [sent.json() for sent in self.transport.on(f"{ROOT}/error")]


def open_door(*, free: bool = True, **sections: Any) -> Door:
    settings = Settings(mqtt={"node_id": NODE}, homeassistant={"enabled": False}, **sections)
    runtime = FakeRuntime(tokens=["a", "b"], free=free)
    scheduler = Scheduler(runtime, queue_size=settings.limits.queue_size, hang_grace_s=1.0)
    door = MqttDoor(settings, scheduler, runtime, [])
    scheduler.observe(door)
    transport = RecordingTransport()
    door.attach(transport)
    scheduler.start()
    return Door(door, scheduler, runtime, transport)


@pytest.fixture
def door() -> Iterator[Door]:
    opened = open_door()
    yield opened
    opened.scheduler.shutdown(WAIT_S)


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        ("abort", b"\xff\xfe", "invalid_utf8"),
        ("abort", b"id\x00", "invalid_request"),
        ("abort", b"x" * 100_000, "invalid_request"),
        ("clear", b"\xed\xa0\x80", "invalid_utf8"),
        ("clear", b"session\x00", "invalid_request"),
        ("clear", b"s" * 129, "invalid_request"),
    ],
)
def test_hostile_abort_and_clear_payloads_are_refused_as_client_mistakes(
    door: Door, topic: str, payload: bytes, code: str
) -> None:
    door.send(f"{ROOT}/{topic}", payload)
    (error,) = door.errors()
    assert error["code"] == code and error["message"].startswith(f"{topic}:") and len(error["message"]) < 300
    assert door.runtime.forgotten == [] and door.runtime.runs == []
    assert door.door.health_payload().last_error is None


def test_the_runtime_cap_on_max_new_tokens_reaches_the_run() -> None:
    opened = open_door(runtime={"max_new_tokens": 5})
    try:
        opened.send(f"{ROOT}/prompt", json.dumps({"id": "many", "prompt": "hi", "max_new_tokens": 100}))
        opened.transport.wait_for(f"{ROOT}/response/many")
        assert opened.runtime.next_run(1).request.max_new_tokens == 5
    finally:
        opened.scheduler.shutdown(WAIT_S)


def test_the_system_limit_comes_from_the_settings() -> None:
    opened = open_door(limits={"max_system_bytes": 10})
    try:
        opened.send(f"{ROOT}/prompt", json.dumps({"id": "sys", "prompt": "hi", "system": "s" * 11}))
        final = opened.transport.on(f"{ROOT}/response/sys")[-1].json()
        assert final["error"]["code"] == "prompt_too_long" and "max_system_bytes" in final["error"]["message"]
        assert opened.runtime.runs == []
    finally:
        opened.scheduler.shutdown(WAIT_S)


@pytest.mark.parametrize(("property_topic", "handed_off"), [("rkllm/reply/x\x01", False), ("rkllm/reply/x", True)])
def test_a_group_request_is_handed_off_only_with_a_property_the_broker_takes(
    property_topic: str, handed_off: bool
) -> None:
    opened = open_door(free=False, cluster={"enabled": True})
    try:
        opened.send(f"{ROOT}/prompt", json.dumps({"id": "busy", "prompt": "hi"}))
        opened.runtime.next_run(1)  # this node is busy now
        opened.send("rkllm/peer/availability", "online")
        opened.send("rkllm/peer/state", json.dumps({"status": "idle", "queue_depth": 0}))
        opened.send("rkllm/prompt", json.dumps({"id": "group", "prompt": "hi"}), response_topic=property_topic)
        forwarded = opened.transport.on("rkllm/peer/prompt")
        assert bool(forwarded) is handed_off
        if not handed_off:
            # Answered here, on its default topic, instead of being passed on with a topic that costs a connection.
            assert opened.errors()[-1]["code"] == "forbidden_topic"
            final = opened.transport.on(f"{ROOT}/response/group")[-1].json()
            assert final["error"]["code"] == "forbidden_topic"
    finally:
        for run in opened.runtime.runs:
            run.finish()
        opened.scheduler.shutdown(WAIT_S)


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"status": ' + b"9" * 5000 + b"}", b"\xff", b"idle"])
def test_a_hostile_peer_state_is_ignored(payload: bytes) -> None:
    opened = open_door(free=False, cluster={"enabled": True})
    try:
        opened.send("rkllm/peer/availability", "online")
        opened.send("rkllm/peer/state", payload)  # must not raise: anyone may publish under {b}/+/state
        opened.send(f"{ROOT}/prompt", json.dumps({"id": "busy", "prompt": "hi"}))
        opened.runtime.next_run(1)
        opened.send("rkllm/prompt", json.dumps({"id": "group", "prompt": "hi"}))
        assert opened.transport.on("rkllm/peer/prompt") == []  # the peer is not known to be idle
    finally:
        for run in opened.runtime.runs:
            run.finish()
        opened.scheduler.shutdown(WAIT_S)
