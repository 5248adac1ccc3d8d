"""Retained final responses: the clearing schedule, the publisher with a fake transport, and the daemon on real brokers
(the embedded 3.1.1 broker, where the bridge clears them; Mosquitto with MQTT 5, where they carry an expiry)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkllm_mqtt.bridge.outgoing import publish_packet_size
from rkllm_mqtt.bridge.retained_finals import ClearSchedule, RetainedFinals
from rkllm_mqtt.broker import EmbeddedBroker
from rkllm_mqtt.settings import LimitsSettings

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready
from .helpers import unique_topic

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")

# -- the schedule ----------------------------------------------------------------------------------------------------


def test_schedule_pops_only_what_is_due_oldest_first() -> None:
    schedule = ClearSchedule()
    schedule.add("r/b", 20.0)
    schedule.add("r/a", 10.0)
    schedule.add("r/c", 30.0)
    assert schedule.next_at() == 10.0
    assert schedule.pop_due(9.9) == []
    assert schedule.pop_due(20.0) == ["r/a", "r/b"]
    assert len(schedule) == 1
    assert schedule.next_at() == 30.0


def test_a_newer_final_on_the_same_topic_postpones_its_clear() -> None:
    schedule = ClearSchedule()
    schedule.add("r/shared", 10.0)
    schedule.add("r/shared", 25.0)
    assert len(schedule) == 1
    # The older entry is due but superseded: clearing now would wipe the newer final.
    assert schedule.pop_due(12.0) == []
    assert schedule.next_at() == 25.0
    assert schedule.pop_due(25.0) == ["r/shared"]
    assert schedule.next_at() is None
    assert len(schedule) == 0


def test_pop_all_empties_the_schedule() -> None:
    schedule = ClearSchedule()
    schedule.add("r/1", 50.0)
    schedule.add("r/2", 5.0)
    schedule.add("r/1", 60.0)
    assert schedule.pop_all() == ["r/2", "r/1"]
    assert len(schedule) == 0
    assert schedule.next_at() is None
    assert schedule.pop_due(1000.0) == []


# -- the publisher, with a fake transport and a fake clock -------------------------------------------------------


@dataclass
class Sent:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    expiry_s: int | None


class FakeTransport:
    def __init__(self, *, v5: bool) -> None:
        self.v5 = v5
        self.sent: list[Sent] = []
        self.cond = threading.Condition()

    @property
    def expires_messages(self) -> bool:
        return self.v5

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
    ) -> object:
        assert qos == 1
        with self.cond:
            self.sent.append(Sent(topic, payload, retain, correlation_data, expiry_s))
            self.cond.notify_all()
        return self.sent[-1]  # taken, as the real transport's message info says


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_mqtt5_final_is_retained_with_an_expiry_and_never_cleared_by_the_bridge() -> None:
    transport, clock = FakeTransport(v5=True), FakeClock()
    finals = RetainedFinals(transport, 60, clock=clock)
    finals.publish("r/n/response/a", b'{"id":"a"}', b"corr")
    assert transport.sent == [Sent("r/n/response/a", b'{"id":"a"}', True, b"corr", 60)]
    assert finals.pending == 0
    clock.now += 3600
    assert finals.clear_due() == 0
    finals.stop()
    assert len(transport.sent) == 1


def test_mqtt311_final_is_retained_then_cleared_once_its_time_is_up() -> None:
    transport, clock = FakeTransport(v5=False), FakeClock()
    finals = RetainedFinals(transport, 60, clock=clock)
    finals.publish("r/n/response/a", b'{"id":"a"}', None)
    clock.now += 30
    finals.publish("r/n/response/b", b'{"id":"b"}', None)
    assert [(s.topic, s.retain, s.expiry_s) for s in transport.sent] == [
        ("r/n/response/a", True, None),
        ("r/n/response/b", True, None),
    ]
    assert finals.pending == 2
    clock.now += 29.9
    assert finals.clear_due() == 0
    clock.now += 0.1
    assert finals.clear_due() == 1
    assert transport.sent[-1] == Sent("r/n/response/a", b"", True, None, None)
    clock.now += 30
    assert finals.clear_due() == 1
    assert transport.sent[-1] == Sent("r/n/response/b", b"", True, None, None)
    assert finals.pending == 0


def test_a_clean_stop_clears_every_pending_final_on_mqtt311() -> None:
    transport, clock = FakeTransport(v5=False), FakeClock()
    finals = RetainedFinals(transport, 60, clock=clock)
    finals.start()
    finals.publish("r/n/response/a", b"{}", None)
    finals.publish("r/reply/porch", b"{}", None)
    finals.stop()
    clears = [s for s in transport.sent if s.payload == b""]
    assert [(s.topic, s.retain) for s in clears] == [("r/n/response/a", True), ("r/reply/porch", True)]
    assert finals.pending == 0
    # A final answered during the stop is published, retained, and not scheduled any more: the stop has cleared.
    finals.publish("r/n/response/late", b"{}", None)
    assert finals.pending == 0


def test_zero_keeps_finals_unretained() -> None:
    for v5 in (True, False):
        transport = FakeTransport(v5=v5)
        finals = RetainedFinals(transport, 0, clock=FakeClock())
        finals.publish("r/n/response/a", b"{}", b"c")
        finals.stop()
        assert transport.sent == [Sent("r/n/response/a", b"{}", False, b"c", None)]


def test_the_clearing_thread_clears_a_due_final_by_itself() -> None:
    transport, clock = FakeTransport(v5=False), FakeClock()
    finals = RetainedFinals(transport, 5, clock=clock)
    finals.start()
    try:
        finals.publish("r/n/response/a", b"{}", None)
        clock.now += 10
        # The next publish wakes the thread (as any would); it must see that "a" is due and clear it.
        finals.publish("r/n/response/b", b"{}", None)
        with transport.cond:
            assert transport.cond.wait_for(lambda: any(s.payload == b"" for s in transport.sent), 20)
        assert [s.topic for s in transport.sent if s.payload == b""] == ["r/n/response/a"]
        assert finals.pending == 1
    finally:
        finals.stop()
    assert [s.topic for s in transport.sent if s.payload == b""] == ["r/n/response/a", "r/n/response/b"]


def test_setting_default_and_bounds() -> None:
    assert LimitsSettings().final_retain_s == 60
    assert LimitsSettings(final_retain_s=0).final_retain_s == 0
    with pytest.raises(ValueError, match="final_retain_s"):
        LimitsSettings(final_retain_s=-1)


# -- the daemon on real brokers ----------------------------------------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def _late_subscriber_gets(probe: Probe, topic: str) -> dict[str, Any]:
    """Subscribe after the answer went out; the retained final must arrive."""
    probe.subscribe(topic)
    messages = probe.wait_topic(topic)
    assert messages[0].retain, "the late subscriber's final should come from the broker's retained store"
    payload: dict[str, Any] = messages[0].json()
    return payload


def test_embedded_broker_late_subscriber_gets_answer_and_refusal_then_the_bridge_clears_them(
    amqtt_broker: EmbeddedBroker, daemons: list[Daemon], tmp_path: Path
) -> None:
    watcher = Probe(amqtt_broker.port).start()
    daemon = Daemon(tmp_path, amqtt_broker.port, limits={"final_retain_s": 1, "max_prompt_bytes": 64}).start()
    daemons.append(daemon)
    wait_ready(watcher, daemon)
    done_topic, refused_topic = f"{daemon.root}/response/fast-1", f"{daemon.root}/response/long-1"
    # The watcher hears the finals as they go out, so the test knows they exist before anyone subscribes late.
    watcher.subscribe(done_topic, refused_topic)
    watcher.publish(f"{daemon.root}/prompt", json.dumps({"id": "fast-1", "prompt": "hi"}))
    watcher.publish(f"{daemon.root}/prompt", json.dumps({"id": "long-1", "prompt": "x" * 100}))
    watcher.wait_json(done_topic, lambda f: f["state"] == "done")
    watcher.wait_json(refused_topic, lambda f: f["state"] == "error")

    late = Probe(amqtt_broker.port).start()
    try:
        assert _late_subscriber_gets(late, done_topic)["state"] == "done"
        refusal = _late_subscriber_gets(late, refused_topic)
        assert refusal["error"]["code"] == "prompt_too_long"
        # Then the bridge clears both: an empty retained publish reaches the current subscribers.
        late.wait_for(lambda msgs: {m.topic for m in msgs if m.payload == b""} == {done_topic, refused_topic})
    finally:
        late.stop()

    # A subscriber after the clear gets nothing: the sentinel's retained message, sent after the subscription to
    # the finals, proves their retained messages (had there been any) would have arrived first.
    sentinel = f"{daemon.root}-{unique_topic('sentinel')}"
    watcher.publish(sentinel, b"here", retain=True)
    after = Probe(amqtt_broker.port).start()
    try:
        after.subscribe(done_topic, refused_topic)
        after.subscribe(sentinel)
        after.wait_topic(sentinel)
        assert after.on(done_topic) == [] and after.on(refused_topic) == []
    finally:
        after.stop()
        watcher.publish(sentinel, b"", retain=True)
        watcher.stop()


class V5Subscriber:
    """An MQTT 5 client that records the Message Expiry Interval of what it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, bytes, bool, int | None]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_topic("v5"), protocol=mqtt.MQTTv5)

    def start(self, topic: str) -> V5Subscriber:
        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            expiry = getattr(message.properties, "MessageExpiryInterval", None)
            with self.cond:
                self.received.append((message.topic, bytes(message.payload), bool(message.retain), expiry))
                self.cond.notify_all()

        self.client.on_message = on_message
        self.client.on_connect = lambda client, *args: client.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", self.port, 30)
        self.client.loop_start()
        return self

    def wait(self) -> tuple[str, bytes, bool, int | None]:
        with self.cond:
            assert self.cond.wait_for(lambda: bool(self.received), 20), "nothing arrived"
            return self.received[0]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@needs_mosquitto
def test_mqtt5_late_subscriber_gets_the_final_with_its_expiry(tmp_path: Path, daemons: list[Daemon]) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        watcher = Probe(broker.port, v5=True).start()
        daemon = Daemon(tmp_path, broker.port, mqtt={"protocol": "5"}, limits={"final_retain_s": 120}).start()
        daemons.append(daemon)
        wait_ready(watcher, daemon)
        topic = f"{daemon.root}/response/q5"
        watcher.subscribe(topic)
        watcher.publish(f"{daemon.root}/prompt", json.dumps({"id": "q5", "prompt": "hi"}))
        watcher.wait_json(topic, lambda f: f["state"] == "done")

        late = V5Subscriber(broker.port).start(topic)
        try:
            got_topic, payload, retained, expiry = late.wait()
            assert (got_topic, retained) == (topic, True)
            assert json.loads(payload)["id"] == "q5"
            # Mosquitto hands on what is left of the interval: the broker drops the final by itself.
            assert expiry is not None and 0 < expiry <= 120
        finally:
            late.stop()
        daemon.stop()
        # Nothing was scheduled for clearing on MQTT 5: the stop sends no empty message to the final's topic.
        assert [m for m in watcher.on(topic) if m.payload == b""] == []
        watcher.stop()
    finally:
        broker.stop()


def test_a_final_the_transport_refused_is_not_scheduled_for_clearing() -> None:
    class Refusing(FakeTransport):
        def publish(self, topic: str, payload: bytes, **kwargs: Any) -> object:
            super().publish(topic, payload, **kwargs)
            return None

    transport, clock = Refusing(v5=False), FakeClock()
    finals = RetainedFinals(transport, 60, clock=clock)
    assert finals.publish("r/n/response/too-big", b"{}", None) is None
    assert finals.pending == 0
    clock.now += 120
    assert finals.clear_due() == 0
    assert [s.payload for s in transport.sent] == [b"{}"]


class _CapturingClient(mqtt.Client):
    """paho's MQTT 5 client with its packet queue replaced by a list: the bytes it would send."""

    def __init__(self) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.packets: list[bytes] = []
        self._sock = self  # type: ignore[assignment]  # paho only builds a packet when it has a socket

    def close(self) -> None:
        pass

    def _packet_queue(self, command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> mqtt.MQTTErrorCode:
        self.packets.append(bytes(packet))
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


@pytest.mark.parametrize("correlation", [None, b"corr-42"])
def test_the_size_check_counts_the_expiry_property(correlation: bytes | None) -> None:
    client = _CapturingClient()
    properties = Properties(PacketTypes.PUBLISH)
    if correlation is not None:
        properties.CorrelationData = correlation
    properties.MessageExpiryInterval = 60
    client._send_publish(1, b"rkllm/n/response/q", b"{}" * 100, 1, True, False, None, properties)
    expected = publish_packet_size(
        "rkllm/n/response/q", b"{}" * 100, qos=1, v5=True, correlation_data=correlation, expires=True
    )
    assert len(client.packets[-1]) == expected
