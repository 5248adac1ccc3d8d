"""The MQTT door without a broker: a recording transport, the real scheduler on the fake runtime.

The dispatcher thread is not started: each test hands the door's handler the items the dispatcher would, in
order, so what the door does with a message is seen synchronously. Runs finish on the scheduler's runner; the
tests wait for the final response, never for time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt.bridge.acks import Delivery
from rkllm_mqtt.bridge.door import FAST_REFUSALS_PER_S, MqttDoor, _Connected
from rkllm_mqtt.bridge.ledger import SettledLedger
from rkllm_mqtt.bridge.publisher import MAX_BACKLOG
from rkllm_mqtt.bridge.rate import EventRate
from rkllm_mqtt.bridge.retained_finals import RetainedFinals
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.core.scheduler import Scheduler
from rkllm_mqtt.errors import RequestError
from rkllm_mqtt.ha.extension import HomeAssistantDiscovery
from rkllm_mqtt.settings import Settings

from .fakes import WAIT_S, FakeRun, FakeRuntime

NODE = "n1"
ROOT = f"rkllm/{NODE}"


@dataclass
class Sent:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


class RecordingTransport:
    """Records what is published; the broker acknowledges each publish at once unless ``hold_acks`` is set."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.backlog = 0
        self.unsent = 0
        self._cond = threading.Condition()
        self.hold_acks = False
        self.held: list[tuple[str, Callable[[], None]]] = []
        self.acknowledged: list[Delivery] = []

    def settle(self, delivery: Delivery | None) -> None:
        if delivery is not None:
            with self._cond:
                self.acknowledged.append(delivery)
                self._cond.notify_all()

    def release(self, topic: str) -> None:
        """The broker's PUBACK for the held publish on ``topic``."""
        with self._cond:
            callback = next(cb for t, cb in self.held if t == topic)
        callback()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        on_acked: Callable[[], None] | None = None,
        handoff: str | None = None,
        expiry_s: int | None = None,
    ) -> object:
        with self._cond:
            self.sent.append(Sent(topic, payload, retain, correlation_data))
            self._cond.notify_all()
            if on_acked is not None and self.hold_acks:
                self.held.append((topic, on_acked))
                return object()
        if on_acked is not None:
            on_acked()
        return object()

    @property
    def expires_messages(self) -> bool:  # as on MQTT 5: retained finals carry an expiry
        return True

    def on(self, topic: str) -> list[Sent]:
        with self._cond:
            return [s for s in self.sent if s.topic == topic]

    def wait_for(self, topic: str) -> Sent:
        with self._cond:
            assert self._cond.wait_for(lambda: any(s.topic == topic for s in self.sent), WAIT_S), topic
            return next(s for s in self.sent if s.topic == topic)


@dataclass
class Rig:
    door: MqttDoor
    scheduler: Scheduler
    runtime: FakeRuntime
    transport: RecordingTransport

    def send(self, topic: str, payload: bytes | str, **fields: Any) -> None:
        raw = payload.encode() if isinstance(payload, str) else payload
        self.door._handle(IncomingMessage(topic=topic, payload=raw, retain=fields.pop("retain", False), **fields))

    def prompt(self, payload: bytes | str, **fields: Any) -> None:
        self.send(f"{ROOT}/prompt", payload, **fields)

    def state(self) -> Any:
        return self.transport.on(f"{ROOT}/state")[-1].json()


def make_rig(*, free: bool = True, inbox_size: int = 100, ledger: SettledLedger | None = None, **limits: Any) -> Rig:
    settings = Settings(
        mqtt={"node_id": NODE},
        homeassistant={"enabled": True},
        limits={"queue_size": 2, **limits},
    )
    runtime = FakeRuntime(tokens=["Hel", "lo"], free=free)
    scheduler = Scheduler(runtime, queue_size=settings.limits.queue_size, hang_grace_s=1.0)
    door = MqttDoor(
        settings, scheduler, runtime, [HomeAssistantDiscovery(settings)], inbox_size=inbox_size, ledger=ledger
    )
    scheduler.observe(door)
    transport = RecordingTransport()
    door.attach(transport, acks=transport)
    for extension in door.extensions:
        extension.start(door)
    scheduler.start()
    return Rig(door, scheduler, runtime, transport)


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = make_rig()
    yield made
    for run in made.runtime.runs:
        run.finish()
    made.scheduler.shutdown(WAIT_S)


def test_a_plain_prompt_is_queued_started_streamed_and_answered(rig: Rig) -> None:
    rig.prompt('{"id": "q1", "prompt": "hi"}')
    final = rig.transport.wait_for(f"{ROOT}/response/q1").json()
    assert (final["state"], final["text"], final["node"]) == ("done", "Hello", NODE)
    statuses = [s.json()["status"] for s in rig.transport.on(f"{ROOT}/response/q1/status")]
    assert statuses == ["queued", "started"]
    chunks = [s.json() for s in rig.transport.on(f"{ROOT}/response/q1/stream")]
    assert chunks == [{"id": "q1", "seq": 0, "text": "Hel"}, {"id": "q1", "seq": 1, "text": "lo"}]
    assert rig.transport.on(f"{ROOT}/last")[-1].json()["id"] == "q1"
    event = rig.transport.on(f"{ROOT}/event")[-1].json()
    assert (event["event_type"], event["id"]) == ("done", "q1")


def test_a_reply_topic_and_correlation_data_carry_through(rig: Rig) -> None:
    rig.prompt('{"id": "q2", "prompt": "hi"}', response_topic="rkllm/reply/me", correlation_data=b"corr")
    final = rig.transport.wait_for("rkllm/reply/me")
    assert final.correlation == b"corr"
    assert all(s.correlation == b"corr" for s in rig.transport.on("rkllm/reply/me/stream"))


@pytest.mark.parametrize(
    ("payload", "code", "answered"),
    [
        (b'{"id": "bad-1", "prompt": "hi", "nope": 1}', "invalid_request", True),
        (b"{not json", "invalid_json", False),
        (b"\xff\xfe", "invalid_utf8", False),
        (b'{"id": "bad-2", "prompt": "hi", "response_topic": "elsewhere/x"}', "forbidden_topic", False),
    ],
)
def test_client_mistakes_are_answered_and_counted_as_rejections(
    rig: Rig, payload: bytes, code: str, answered: bool
) -> None:
    rig.prompt(payload)
    error = rig.transport.on(f"{ROOT}/error")[-1].json()
    assert error["code"] == code
    if answered:
        final = rig.transport.on(f"{ROOT}/response/bad-1")[-1].json()
        assert (final["state"], final["error"]["code"]) == ("error", code)
    state = rig.state()
    assert (state["requests_total"], state["rejected_total"], state["errors_total"]) == (1, 1, 0)
    assert rig.door.health_payload().last_error is None
    assert rig.runtime.runs == []


def test_a_retained_prompt_is_refused(rig: Rig) -> None:
    rig.prompt("hi", retain=True)
    assert rig.transport.on(f"{ROOT}/error")[-1].json()["code"] == "invalid_request"
    assert rig.runtime.runs == []


def test_a_full_queue_answers_queue_full_as_the_bridges_error() -> None:
    rig = make_rig(free=False)
    try:
        for n in range(4):
            rig.prompt(json.dumps({"id": f"f{n}", "prompt": "hi"}))
            if n == 0:
                rig.runtime.next_run(1)
        final = rig.transport.on(f"{ROOT}/response/f3")[-1].json()
        assert final["error"]["code"] == "queue_full"
        state = rig.state()
        assert (state["status"], state["request_id"], state["request_source"]) == ("busy", "f0", "mqtt")
        assert (state["queue_depth"], state["errors_total"], state["rejected_total"]) == (2, 1, 0)
    finally:
        for run in rig.runtime.runs:
            run.finish()
        rig.scheduler.shutdown(WAIT_S)


def test_a_duplicate_id_is_refused_without_answering_the_pending_request() -> None:
    rig = make_rig(free=False)
    try:
        rig.prompt('{"id": "dup", "prompt": "hi"}')
        run = rig.runtime.next_run(1)
        rig.prompt('{"id": "dup", "prompt": "again"}')
        assert rig.transport.on(f"{ROOT}/error")[-1].json()["code"] == "invalid_request"
        assert rig.transport.on(f"{ROOT}/response/dup") == []  # the pending one's topic gets no stray final
        run.finish()
        assert rig.transport.wait_for(f"{ROOT}/response/dup").json()["state"] == "done"
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_abort_by_id_of_a_queued_request_and_of_an_unknown_one() -> None:
    rig = make_rig(free=False)
    try:
        rig.prompt('{"id": "running", "prompt": "hi"}')
        run = rig.runtime.next_run(1)
        rig.prompt('{"id": "waiting", "prompt": "hi"}')
        rig.send(f"{ROOT}/abort", "waiting")
        final = rig.transport.on(f"{ROOT}/response/waiting")[-1].json()
        assert (final["state"], final["finish_reason"]) == ("aborted", "abort")
        rig.send(f"{ROOT}/abort", "nobody")
        assert "nobody" in rig.transport.on(f"{ROOT}/error")[-1].json()["message"]
        rig.send(f"{ROOT}/abort", "")  # the running one
        assert rig.transport.wait_for(f"{ROOT}/response/running").json()["state"] == "aborted"
        assert run.cancel.reason == "abort"
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_clear_reaches_the_runtime(rig: Rig) -> None:
    rig.send(f"{ROOT}/clear", "held")
    rig.send(f"{ROOT}/clear", "")
    rig.send(f"{ROOT}/clear", "x", retain=True)  # retained control messages are ignored
    assert rig.runtime.forgotten == ["held", None]


def test_a_runtime_failure_is_the_bridges_error_and_shows_in_health(rig: Rig) -> None:
    def crash(run: FakeRun) -> None:
        raise RequestError("runtime_crashed", "worker killed by SIGSEGV")

    rig.runtime.before_run = crash
    rig.prompt('{"id": "c1", "prompt": "hi"}')
    final = rig.transport.wait_for(f"{ROOT}/response/c1").json()
    assert final["error"]["code"] == "runtime_crashed"
    assert rig.transport.on(f"{ROOT}/error")[-1].json()["code"] == "runtime_crashed"
    health = rig.transport.on(f"{ROOT}/health")[-1].json()
    assert health["last_error"] == "worker killed by SIGSEGV"


def test_health_has_a_start_time_not_an_uptime(rig: Rig) -> None:
    health = rig.door.health_payload().model_dump()
    assert "uptime_s" not in health
    assert health["started_at"] == pytest.approx(rig.door.started_at, abs=0.001)
    assert health["status"] == "ok" and health["version"]


def test_healthy_has_no_side_effects(rig: Rig) -> None:
    before = rig.door.dispatcher.depth
    rig.door.healthy()
    rig.door.healthy()
    assert rig.door.dispatcher.depth == before


def test_a_connect_republishes_retained_status_and_announces_discovery(rig: Rig) -> None:
    rig.door._handle(_Connected())
    topics = {s.topic for s in rig.transport.sent}
    assert {f"{ROOT}/health", f"{ROOT}/state"} <= topics
    assert any(t.startswith("homeassistant/") and t.endswith("/config") for t in topics)


def test_a_full_inbox_never_blocks_and_never_drops_a_request() -> None:
    rig = make_rig(free=False, inbox_size=2)
    try:
        rig.prompt('{"id": "running", "prompt": "hi"}')
        run = rig.runtime.next_run(1)
        door = rig.door
        # The dispatcher is not running: the inbox fills, and the paho-side entry point must still not wait.
        for n in range(2):
            door.on_message(
                IncomingMessage(f"{ROOT}/prompt", json.dumps({"id": f"in{n}", "prompt": "x"}).encode(), False)
            )
        assert door.dispatcher.depth == 2
        door.on_message(IncomingMessage(f"{ROOT}/prompt", b'{"id": "over", "prompt": "x"}', False))
        final = rig.transport.on(f"{ROOT}/response/over")[-1].json()
        assert final["error"]["code"] == "queue_full"
        door.on_message(IncomingMessage(f"{ROOT}/prompt", b"{broken", False))
        assert rig.transport.on(f"{ROOT}/error")[-1].json()["code"] == "invalid_json"
        door.on_message(IncomingMessage(f"{ROOT}/abort", b"running", False))  # carried out at once
        assert rig.transport.wait_for(f"{ROOT}/response/running").json()["state"] == "aborted"
        door.on_message(IncomingMessage("homeassistant/status", b"online", False))  # no request in it: let go
        assert door.dispatcher.depth == 2
        assert run.cancel.reason == "abort"
    finally:
        rig.scheduler.shutdown(WAIT_S)


# -- settling: a QoS 1 prompt is acknowledged once its final is with the broker (docs/reliability.md) --------


def test_a_prompt_is_acknowledged_only_once_its_final_is_with_the_broker(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    rig = make_rig(ledger=ledger)
    rig.transport.hold_acks = True
    delivery = Delivery(mid=7, epoch=0)
    try:
        rig.prompt('{"id": "s1", "prompt": "hi"}', qos=1, delivery=delivery)
        rig.transport.wait_for(f"{ROOT}/response/s1")
        assert ledger.contains("s1"), "recorded before the final went out"
        assert rig.transport.acknowledged == []
        rig.transport.release(f"{ROOT}/response/s1")
        assert rig.transport.acknowledged == [delivery]
        assert ledger.unsettled_finals() == []
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_a_redelivered_prompt_answered_before_is_acknowledged_and_not_run(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    ledger.settle("done-before")
    rig = make_rig(ledger=ledger)
    delivery = Delivery(mid=3, epoch=0)
    try:
        rig.prompt('{"id": "done-before", "prompt": "hi"}', qos=1, dup=True, delivery=delivery)
        assert rig.transport.acknowledged == [delivery]
        assert rig.transport.on(f"{ROOT}/response/done-before") == []
        assert rig.runtime.runs == []
        # Without the DUP flag the same id is a new request: ids may be reused.
        rig.prompt('{"id": "done-before", "prompt": "hi"}', qos=1, delivery=Delivery(mid=4, epoch=0))
        assert rig.transport.wait_for(f"{ROOT}/response/done-before").json()["state"] == "done"
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_a_redelivered_prompt_still_running_joins_it(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    rig = make_rig(free=False, ledger=ledger)
    first, again = Delivery(mid=5, epoch=0), Delivery(mid=5, epoch=1)
    try:
        rig.prompt('{"id": "long", "prompt": "hi"}', qos=1, delivery=first)
        run = rig.runtime.next_run(1)
        rig.prompt('{"id": "long", "prompt": "hi"}', qos=1, dup=True, delivery=again)
        assert rig.transport.on(f"{ROOT}/error") == [], "not refused as a duplicate id"
        run.finish()
        rig.transport.wait_for(f"{ROOT}/response/long")
        with rig.transport._cond:
            assert rig.transport._cond.wait_for(lambda: len(rig.transport.acknowledged) == 2, WAIT_S)
        assert len(rig.runtime.runs) == 1
        assert len(rig.transport.on(f"{ROOT}/response/long")) == 1
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_a_rejected_prompt_is_settled_by_its_final_and_one_without_id_at_once(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    rig = make_rig(ledger=ledger)
    with_id, without_id = Delivery(mid=1, epoch=0), Delivery(mid=2, epoch=0)
    try:
        rig.prompt('{"id": "bad", "prompt": "hi", "nope": 1}', qos=1, delivery=with_id)
        rig.prompt(b"{not json", qos=1, delivery=without_id)
        assert rig.transport.acknowledged == [with_id, without_id]
        assert ledger.contains("bad")
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_finals_left_unsettled_by_a_crash_are_published_again_on_connect(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    ledger.record_final("lost-ack", f"{ROOT}/response/lost-ack", b'{"id": "lost-ack"}', b"corr")
    rig = make_rig(ledger=ledger)
    try:
        rig.door._handle(_Connected())
        again = rig.transport.wait_for(f"{ROOT}/response/lost-ack")
        assert (again.payload, again.correlation) == (b'{"id": "lost-ack"}', b"corr")
        assert ledger.unsettled_finals() == []
        rig.door._handle(_Connected())  # a reconnect does not publish it once more
        assert len(rig.transport.on(f"{ROOT}/response/lost-ack")) == 1
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_a_hand_off_sent_again_is_recognised_by_its_token(tmp_path: Path) -> None:
    ledger = SettledLedger(tmp_path / "settled.log")
    ledger.open()
    rig = make_rig(ledger=ledger)
    token = "0123456789abcdef0123456789abcdef"
    try:
        rig.prompt('{"id": "h1", "prompt": "hi"}', qos=1, handoff=token, delivery=Delivery(mid=1, epoch=0))
        rig.transport.wait_for(f"{ROOT}/response/h1")
        # The peer that handed it on crashed before the broker acknowledged its forward: it sends it again.
        again = Delivery(mid=2, epoch=0)
        rig.prompt('{"id": "h1", "prompt": "hi"}', qos=1, handoff=token, delivery=again)
        assert again in rig.transport.acknowledged
        assert len(rig.transport.on(f"{ROOT}/response/h1")) == 1
        assert len(rig.runtime.runs) == 1
        # Another hand-off reusing the id is a new request (once the first one has left the scheduler).
        with rig.transport._cond:
            assert rig.transport._cond.wait_for(lambda: rig.state()["status"] == "idle", WAIT_S)
        other = "fedcba9876543210fedcba9876543210"
        rig.prompt('{"id": "h1", "prompt": "hi"}', qos=1, handoff=other, delivery=Delivery(mid=3, epoch=0))
        with rig.transport._cond:
            assert rig.transport._cond.wait_for(lambda: len(rig.transport.on(f"{ROOT}/response/h1")) == 2, WAIT_S)
        # A token not made by a bridge is ignored, never looked up.
        rig.prompt('{"id": "h2", "prompt": "hi"}', qos=1, handoff="../../etc", delivery=Delivery(mid=4, epoch=0))
        rig.transport.wait_for(f"{ROOT}/response/h2")
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_a_payload_the_parser_chokes_on_is_answered_and_settled(tmp_path: Path) -> None:
    rig = make_rig()
    delivery = Delivery(mid=9, epoch=0)
    try:
        rig.prompt(b'{"id": "deep", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", qos=1, delivery=delivery)
        assert rig.transport.on(f"{ROOT}/error")[-1].json()["code"] == "invalid_json"
        assert rig.transport.acknowledged == [delivery], "an unsettled prompt would hold back every later one"
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_an_abort_that_overtakes_its_prompt_still_aborts_it() -> None:
    # Prompts and aborts come on two connections: a prompt the broker holds back behind its in-flight window
    # arrives after the abort its sender published later.
    rig = make_rig(free=False)
    try:
        rig.prompt('{"id": "running", "prompt": "hi"}')
        rig.runtime.next_run(1)
        rig.send(f"{ROOT}/abort", "late")
        assert "late" in rig.transport.on(f"{ROOT}/error")[-1].json()["message"]
        rig.prompt('{"id": "late", "prompt": "hi"}')
        final = rig.transport.wait_for(f"{ROOT}/response/late").json()
        assert (final["state"], final["finish_reason"]) == ("aborted", "abort")
        rig.prompt('{"id": "late", "prompt": "again"}')  # remembered once: the id may be used again
        assert rig.transport.on(f"{ROOT}/response/late/status")[-1].json()["status"] == "queued"
        rig.send(f"{ROOT}/abort", "")
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_in_a_flood_a_refusal_is_answered_by_its_final_alone_and_not_kept_retained() -> None:
    rig = make_rig()
    rig.door.attach(rig.transport, RetainedFinals(rig.transport, 60), acks=rig.transport)
    try:
        rig.prompt(json.dumps({"id": "calm", "prompt": 5}))
        calm = rig.transport.wait_for(f"{ROOT}/response/calm")
        assert calm.retain and calm.json()["error"]["code"] == "invalid_request"
        errors = len(rig.transport.on(f"{ROOT}/error"))
        assert errors == 1
        rig.transport.backlog = MAX_BACKLOG  # the broker is behind by that many publications
        for qos in (0, 1):
            delivery = Delivery(mid=9, epoch=0) if qos else None
            rig.prompt(json.dumps({"id": f"flood{qos}", "prompt": 5}), qos=qos, delivery=delivery)
            flood = rig.transport.wait_for(f"{ROOT}/response/flood{qos}")
            assert not flood.retain and flood.json()["error"]["code"] == "invalid_request"
        assert len(rig.transport.on(f"{ROOT}/error")) == errors  # the final alone
    finally:
        rig.scheduler.shutdown(WAIT_S)


def test_refusals_coming_fast_are_answered_by_their_final_alone() -> None:
    rig = make_rig()
    rig.door._refusals = EventRate(FAST_REFUSALS_PER_S, clock=lambda: 100.25)  # all of them within one second
    try:
        count = FAST_REFUSALS_PER_S * 3
        for n in range(count):  # a flood of malformed prompts, faster than any client makes mistakes
            rig.prompt(json.dumps({"id": f"bad{n}", "prompt": 5}))
        finals = [rig.transport.on(f"{ROOT}/response/bad{n}") for n in range(count)]
        assert all(len(f) == 1 and f[0].json()["error"]["code"] == "invalid_request" for f in finals)
        # Error events and state updates for the first ones; past the rate, the finals alone.
        assert FAST_REFUSALS_PER_S - 5 <= len(rig.transport.on(f"{ROOT}/error")) <= FAST_REFUSALS_PER_S + 1
        assert len(rig.transport.on(f"{ROOT}/state")) <= FAST_REFUSALS_PER_S + 2
    finally:
        rig.scheduler.shutdown(WAIT_S)
