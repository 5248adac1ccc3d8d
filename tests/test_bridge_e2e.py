"""End to end: the daemon process, a real broker, the simulated runtime through the real worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready
from .helpers import unique_topic

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.fixture
def probe(amqtt_broker: EmbeddedBroker) -> Iterator[Probe]:
    client = Probe(amqtt_broker.port).start()
    yield client
    client.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def launch(daemons: list[Daemon], tmp_path: Path, port: int, probe: Probe, **sections: dict[str, Any]) -> Daemon:
    daemon = Daemon(tmp_path, port, **sections).start()
    daemons.append(daemon)
    wait_ready(probe, daemon)
    probe.subscribe(f"{daemon.root}/#")
    return daemon


def finals(probe: Probe, daemon: Daemon) -> dict[str, list[dict[str, Any]]]:
    """Final responses on the default topics, by id (not the empty messages that clear retained finals)."""
    out: dict[str, list[dict[str, Any]]] = {}
    prefix = f"{daemon.root}/response/"
    for message in probe.messages:
        rest = message.topic[len(prefix) :] if message.topic.startswith(prefix) else None
        if rest and "/" not in rest and message.payload:
            out.setdefault(rest, []).append(message.json())
    return out


def errors(probe: Probe, daemon: Daemon) -> list[dict[str, Any]]:
    return [m.json() for m in probe.on(f"{daemon.root}/error")]


def wait_log(daemon: Daemon, event: str, count: int = 1, timeout: float = 20.0) -> None:
    """Wait until the daemon has logged ``event`` ``count`` times (its log is the barrier)."""
    deadline = time.monotonic() + timeout
    while sum(1 for e in daemon.logs() if e.get("event") == event) < count:
        assert time.monotonic() < deadline, f"the daemon never logged {event}"
        time.sleep(0.05)


def sentinel(probe: Probe, daemon: Daemon, request_id: str) -> None:
    """A request answered after everything published before it: whatever those caused has been published too."""
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": request_id, "prompt": "sentinel", "max_new_tokens": 1}))
    probe.wait_json(f"{daemon.root}/response/{request_id}", lambda r: True)


def test_plain_prompt_streams_then_answers_once(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe)
    probe.publish(f"{daemon.root}/prompt", "Hello bridge")
    final = probe.wait_json(f"{daemon.root}/last", lambda r: r.get("state") == "done")
    request_id = final["id"]
    reply = f"{daemon.root}/response/{request_id}"
    chunks = [m.json() for m in probe.on(f"{reply}/stream")]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert final["text"].startswith("[turn 1] You said: Hello bridge.")
    assert final["finish_reason"] == "stop" and final["error"] is None
    assert final["usage"]["completion_tokens"] == 12
    assert set(final["timing"]) >= {"queued_ms", "ttft_ms", "generate_ms", "total_ms", "tokens_per_s"}
    assert len(probe.on(reply)) == 1
    statuses = [m.json()["status"] for m in probe.on(f"{reply}/status")]
    assert statuses == ["queued", "started"]
    model = probe.wait_json(f"{daemon.root}/model", lambda m: True)
    assert model["abi"] == "1.3" and model["model_name"] == "simulated" and model["load_time_ms"] >= 0
    state = probe.wait_json(f"{daemon.root}/state", lambda s: s["status"] == "idle" and s["tokens_per_s"])
    assert state["requests_total"] == 1 and state["errors_total"] == 0 and state["ttft_ms"] is not None
    assert probe.on(f"{daemon.root}/availability")[-1].payload == b"online"


def test_json_request_with_reply_topic_and_session(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe)
    reply = f"rkllm/reply/{unique_topic('kitchen')}"
    probe.subscribe(f"{reply}/#", reply)
    for turn, prompt in enumerate(["first", "second"], start=1):
        body = {"id": f"turn-{turn}", "prompt": prompt, "session": "kitchen", "response_topic": reply}
        probe.publish(f"{daemon.root}/prompt", json.dumps(body))
        final = probe.wait_json(reply, lambda r, t=turn: r["id"] == f"turn-{t}")
        assert final["text"].startswith(f"[turn {turn}]")
        assert final["session"] == "kitchen"
    stream_ids = {m.json()["id"] for m in probe.on(f"{reply}/stream")}
    assert stream_ids == {"turn-1", "turn-2"}
    assert not [m for m in probe.messages if m.topic.startswith(f"{daemon.root}/response/turn-")]
    probe.publish(f"{daemon.root}/clear", "kitchen")
    wait_log(daemon, "history_cleared")
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "turn-3", "prompt": "again", "session": "kitchen"}))
    final = probe.wait_json(f"{daemon.root}/response/turn-3", lambda r: True)
    assert final["text"].startswith("[turn 1]")


def test_burst_larger_than_the_queue_is_answered_in_full(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    # A runtime slow enough that the first request is still running when the whole burst has arrived, on any
    # machine: 100,000 tokens at 20 a second. The burst's own requests are short (max_new_tokens).
    daemon = launch(
        daemons,
        tmp_path,
        amqtt_broker.port,
        probe,
        runtime={"model_path": "sim:rate=20,prefill_ms=0,tokens=100000"},
        limits={"queue_size": 3},
    )
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "first", "prompt": "x"}))
    probe.wait_topic(f"{daemon.root}/response/first/stream", 1)
    ids = [f"burst-{i}" for i in range(24)]
    for request_id in ids:
        probe.publish(
            f"{daemon.root}/prompt", json.dumps({"id": request_id, "prompt": request_id, "max_new_tokens": 2})
        )

    def heard(request_id: str) -> bool:
        return bool(
            probe.on(f"{daemon.root}/response/{request_id}/status") or probe.on(f"{daemon.root}/response/{request_id}")
        )

    probe.wait_for(lambda msgs: all(heard(rid) for rid in ids), timeout=60)
    # The premise: every burst request arrived while the first one ran, so the queue filled.
    assert probe.on(f"{daemon.root}/response/first") == [], "the first request must still be running"
    full = [rid for rid, r in finals(probe, daemon).items() if r[0]["error"] and r[0]["error"]["code"] == "queue_full"]
    assert len(full) == len(ids) - 3
    # The conclusion: once the first one is aborted, every request gets exactly one final.
    probe.publish(f"{daemon.root}/abort", "first")
    probe.wait_for(lambda msgs: len(finals(probe, daemon)) == len(ids) + 1, timeout=60)
    answered = finals(probe, daemon)
    assert set(answered) == {"first", *ids}
    assert all(len(responses) == 1 for responses in answered.values()), "exactly one final per request"
    done = [rid for rid, r in answered.items() if r[0]["state"] == "done"]
    assert done == ids[:3] or sorted(done) == sorted(ids[:3])
    assert answered["first"][0]["state"] == "aborted"
    assert {e["id"] for e in errors(probe, daemon) if e["code"] == "queue_full"} == set(full)
    state = probe.wait_json(
        f"{daemon.root}/state", lambda s: s["status"] == "idle" and s["queue_depth"] == 0 and s["requests_total"] == 25
    )
    assert (state["errors_total"], state["rejected_total"]) == (len(full), 0)


def test_abort_queued_and_running_requests(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(
        daemons, tmp_path, amqtt_broker.port, probe, runtime={"model_path": "sim:rate=20,prefill_ms=0,tokens=400"}
    )
    for request_id in ("long", "waiting", "next"):
        probe.publish(f"{daemon.root}/prompt", json.dumps({"id": request_id, "prompt": request_id}))
    probe.wait_topic(f"{daemon.root}/response/long/stream", 2)
    probe.publish(f"{daemon.root}/abort", "waiting")
    queued = probe.wait_json(f"{daemon.root}/response/waiting", lambda r: True)
    assert queued["state"] == "aborted" and queued["error"]["code"] == "aborted" and queued["text"] == ""
    probe.publish(f"{daemon.root}/abort", "")
    running = probe.wait_json(f"{daemon.root}/response/long", lambda r: True)
    assert running["state"] == "aborted" and running["finish_reason"] == "abort"
    assert running["text"] and running["error"]["code"] == "aborted"
    probe.publish(f"{daemon.root}/abort", "next")
    nxt = probe.wait_json(f"{daemon.root}/response/next", lambda r: True)
    assert nxt["state"] == "aborted"
    assert not probe.on(f"{daemon.root}/response/waiting/stream")


def test_timeout_answers_with_the_partial_text(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(
        daemons, tmp_path, amqtt_broker.port, probe, runtime={"model_path": "sim:rate=40,prefill_ms=0,tokens=1000"}
    )
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "slow", "prompt": "x", "timeout_s": 0.5}))
    final = probe.wait_json(f"{daemon.root}/response/slow", lambda r: True)
    assert final["state"] == "timeout" and final["finish_reason"] == "timeout"
    assert final["error"]["code"] == "timeout" and final["text"]


GENERATED = "(generated)"  # plain text gets an id from the bridge, so its refusal has a final too
MALFORMED: list[tuple[bytes, str, str | None]] = [
    (b'{"prompt": "x", "id": "ok-1"', "invalid_json", None),
    (b'  {"id": "a1"}', "invalid_request", "a1"),
    (b'{"prompt": "x", "id": "bad id!"}', "invalid_request", None),
    (b'{"prompt": "x", "id": "f1", "temprature": 0.3}', "invalid_request", "f1"),
    (b'{"prompt": 5, "id": "t1"}', "invalid_request", "t1"),
    (b"\xff\xfe not utf-8", "invalid_utf8", None),
    (b"   ", "invalid_request", GENERATED),
    (json.dumps({"id": "big", "prompt": "x" * 5000}).encode(), "prompt_too_long", "big"),
]


def test_malformed_requests_get_their_code_and_the_daemon_keeps_serving(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    """Each rule has its unit test (tests/test_requests.py, tests/test_door.py); here one daemon takes them all
    over a real broker, answers each on the error topic (and its reply topic when the id is known), and serves on."""
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe, limits={"max_prompt_bytes": 4096})
    for index, (payload, code, expected_id) in enumerate(MALFORMED):
        probe.publish(f"{daemon.root}/prompt", payload)
        probe.wait_for(lambda msgs, n=index + 1: len(errors(probe, daemon)) >= n)
        error = errors(probe, daemon)[index]
        if expected_id == GENERATED:
            assert error["code"] == code and str(error.get("id")).startswith("r-"), payload
            known_id = error["id"]
        else:
            assert (error["code"], error.get("id")) == (code, expected_id), payload
            known_id = expected_id
        assert error["message"]
        if known_id is not None:
            final = probe.wait_json(f"{daemon.root}/response/{known_id}", lambda r: True)
            assert final["state"] == "error" and final["error"]["code"] == code
    probe.publish(f"{daemon.root}/prompt", b"[1, 2, 3]")  # not starting with '{': plain text, accepted
    final = probe.wait_json(f"{daemon.root}/last", lambda r: True)
    assert final["state"] == "done" and "[1, 2, 3]" in final["text"]
    state = probe.wait_json(f"{daemon.root}/state", lambda s: s["requests_total"] == len(MALFORMED) + 1)
    assert (state["rejected_total"], state["errors_total"]) == (len(MALFORMED), 0)
    health = probe.wait_json(f"{daemon.root}/health", lambda h: True)
    assert health["last_error"] is None, "a client's mistake is not the bridge's error"


FORBIDDEN_REPLY_TOPICS = ["homeassistant/sensor/x/config", "rkllm/replyx", "rkllm/reply/+/x", "$SYS/x", "other/place"]


def test_forbidden_reply_topics_are_never_written(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe)
    for reply_topic in FORBIDDEN_REPLY_TOPICS:
        if "+" not in reply_topic and not reply_topic.startswith("$"):
            probe.subscribe(f"{reply_topic}/#", reply_topic)
    for index, reply_topic in enumerate(FORBIDDEN_REPLY_TOPICS):
        body = {"id": f"evil-{index}", "prompt": "x", "response_topic": reply_topic}
        probe.publish(f"{daemon.root}/prompt", json.dumps(body))
        final = probe.wait_json(f"{daemon.root}/response/evil-{index}", lambda r: True)
        assert final["error"]["code"] == "forbidden_topic", reply_topic
    assert {e["id"] for e in errors(probe, daemon) if e["code"] == "forbidden_topic"} == {
        f"evil-{index}" for index in range(len(FORBIDDEN_REPLY_TOPICS))
    }
    sentinel(probe, daemon, "after-evil")
    for reply_topic in FORBIDDEN_REPLY_TOPICS:
        assert not [m for m in probe.messages if m.topic == reply_topic or m.topic.startswith(reply_topic + "/")]


def test_own_topics_cannot_be_used_as_reply(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe, limits={"response_topic_prefixes": ["rkllm"]})
    body = {"id": "loop", "prompt": "x", "response_topic": f"{daemon.root}/state"}
    probe.publish(f"{daemon.root}/prompt", json.dumps(body))
    error = probe.wait_json(f"{daemon.root}/error", lambda e: e["code"] == "forbidden_topic")
    assert error["id"] == "loop"


def test_runtime_crash_is_answered_and_recovered(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(
        daemons, tmp_path, amqtt_broker.port, probe, runtime={"model_path": "sim:rate=200,prefill_ms=0,crash_at=20"}
    )
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "boom", "prompt": "x", "max_new_tokens": 40}))
    final = probe.wait_json(f"{daemon.root}/response/boom", lambda r: True)
    assert final["state"] == "error" and final["error"]["code"] == "runtime_crashed"
    assert probe.wait_json(f"{daemon.root}/error", lambda e: e["code"] == "runtime_crashed")["id"] == "boom"
    probe.wait_json(f"{daemon.root}/health", lambda h: h["runtime"] == "restarting")
    probe.wait_json(f"{daemon.root}/health", lambda h: h["runtime"] == "ready" and h["restarts"] == 1)
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "fine", "prompt": "x", "max_new_tokens": 5}))
    assert probe.wait_json(f"{daemon.root}/response/fine", lambda r: True)["state"] == "done"


def test_failed_runtime_keeps_the_bridge_up_and_answers_not_ready(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = Daemon(
        tmp_path, amqtt_broker.port, runtime={"model_path": str(tmp_path / "missing.rkllm"), "restart_backoff_s": 30}
    ).start()
    daemons.append(daemon)
    probe.subscribe(f"{daemon.root}/#")
    health = probe.wait_json(f"{daemon.root}/health", lambda h: h["runtime"] == "failed")
    assert health["status"] == "error" and "missing.rkllm" in health["last_error"]
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "early", "prompt": "x"}))
    final = probe.wait_json(f"{daemon.root}/response/early", lambda r: True)
    assert final["error"]["code"] == "not_ready" and "missing.rkllm" in final["error"]["message"]
    assert probe.wait_json(f"{daemon.root}/state", lambda s: s["status"] == "error")


def test_sampling_is_refused_on_abi_1_2(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe, runtime={"abi": "1.2"})
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "hot", "prompt": "x", "temperature": 0.1}))
    final = probe.wait_json(f"{daemon.root}/response/hot", lambda r: True)
    assert final["error"]["code"] == "unsupported" and "temperature" in final["error"]["message"]
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "capped", "prompt": "x", "max_new_tokens": 3}))
    capped = probe.wait_json(f"{daemon.root}/response/capped", lambda r: True)
    assert capped["state"] == "done" and capped["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3


def test_sigterm_answers_queued_publishes_offline_and_exits_zero(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(
        daemons,
        tmp_path,
        amqtt_broker.port,
        probe,
        runtime={"model_path": "sim:rate=50,prefill_ms=0,tokens=2000"},
        limits={"shutdown_grace_s": 0.5},
    )
    for request_id in ("running", "queued-1", "queued-2"):
        probe.publish(f"{daemon.root}/prompt", json.dumps({"id": request_id, "prompt": request_id}))
    probe.wait_topic(f"{daemon.root}/response/running/stream", 1)
    # The premise: both others are in the queue (the first chunk of one says nothing of when the next prompts were
    # taken in; one still in the inbox at the stop is refused, not aborted).
    probe.wait_json(f"{daemon.root}/state", lambda s: s["queue_depth"] == 2 and s["request_id"] == "running")
    assert daemon.stop() == 0
    probe.wait_for(lambda msgs: len(finals(probe, daemon)) == 3, timeout=10)
    answered = finals(probe, daemon)
    assert {rid: r[0]["state"] for rid, r in answered.items()} == {
        "running": "aborted",
        "queued-1": "aborted",
        "queued-2": "aborted",
    }
    probe.wait_for(lambda msgs: probe.on(f"{daemon.root}/availability")[-1].payload == b"offline", timeout=10)


@needs_mosquitto
def test_mqtt5_response_topic_and_correlation_data(tmp_path: Path, daemons: list[Daemon]) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    probe = Probe(broker.port, v5=True).start()
    try:
        daemon = launch(daemons, tmp_path, broker.port, probe, mqtt={"protocol": "auto"})
        assert any(e.get("protocol") == "5" for e in daemon.logs() if e.get("event") == "mqtt_connected")
        reply = f"rkllm/reply/{unique_topic('nodered')}"
        probe.subscribe(f"{reply}/#", reply)
        probe.publish(
            f"{daemon.root}/prompt",
            json.dumps({"id": "v5-1", "prompt": "hi"}),
            response_topic=reply,
            correlation=b"\x00corr-42",
        )
        probe.wait_topic(reply, 1)
        final = probe.on(reply)[0]
        assert final.json()["state"] == "done"
        assert final.correlation == b"\x00corr-42"
        chunks = probe.on(f"{reply}/stream")
        assert chunks and all(c.correlation == b"\x00corr-42" for c in chunks)
        statuses = probe.on(f"{reply}/status")
        assert [s.json()["status"] for s in statuses] == ["queued", "started"]
        assert all(s.correlation == b"\x00corr-42" for s in statuses)
        probe.publish(f"{daemon.root}/prompt", "plain", response_topic="homeassistant/evil", correlation=b"c")
        error = probe.wait_json(f"{daemon.root}/error", lambda e: e["code"] == "forbidden_topic")
        # The plain-text request got an id; its refusal is answered on the default topic, never on the refused one.
        assert str(error["id"]).startswith("r-")
        final = probe.wait_json(f"{daemon.root}/response/{error['id']}", lambda r: True)
        assert final["error"]["code"] == "forbidden_topic" and final.get("id") == error["id"]
    finally:
        probe.stop()
        broker.stop()


@needs_mosquitto
def test_broker_restart_mid_stream_still_delivers_the_final_once(tmp_path: Path, daemons: list[Daemon]) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    node = unique_topic("node")
    listener = Probe(broker.port, v5=True, persistent=True, client_id=unique_topic("listener")).start()
    sender = Probe(broker.port, v5=True).start()
    try:
        daemon = Daemon(
            tmp_path,
            broker.port,
            node=node,
            mqtt={"protocol": "auto"},
            runtime={"model_path": "sim:rate=20,prefill_ms=0,tokens=60"},
        )
        daemon.start()
        daemons.append(daemon)
        wait_ready(sender, daemon)
        listener.subscribe(f"{daemon.root}/response/#")
        sender.publish(f"{daemon.root}/prompt", json.dumps({"id": "survivor", "prompt": "x"}))
        listener.wait_topic(f"{daemon.root}/response/survivor/stream", 3)
        broker.stop()
        broker.start()
        final_topic = f"{daemon.root}/response/survivor"
        listener.wait_topic(final_topic, 1, timeout=40)
        # A repeat of the final (paho resending after the reconnect) would come before the sentinel's answer.
        sender.publish(f"{daemon.root}/prompt", json.dumps({"id": "sentinel", "prompt": "x", "max_new_tokens": 1}))
        listener.wait_topic(f"{daemon.root}/response/sentinel", 1, timeout=40)
        finals_seen = [m for m in listener.on(final_topic) if m.json()["id"] == "survivor"]
        assert len(finals_seen) == 1
        final = finals_seen[0].json()
        assert final["state"] == "done"
        seqs = sorted({m.json()["seq"] for m in listener.on(f"{final_topic}/stream")})
        assert seqs == list(range(len(seqs)))
        assert (
            "".join({m.json()["seq"]: m.json()["text"] for m in listener.on(f"{final_topic}/stream")}[s] for s in seqs)
            == final["text"]
        )
    finally:
        listener.stop()
        sender.stop()
        broker.stop()


def test_auto_protocol_falls_back_to_311_on_a_311_only_broker(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe, mqtt={"protocol": "auto"})
    connects = [e for e in daemon.logs() if e.get("event") == "mqtt_connected"]
    assert connects and connects[-1]["protocol"] == "3.1.1"
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "fallback", "prompt": "x"}))
    assert probe.wait_json(f"{daemon.root}/response/fallback", lambda r: True)["state"] == "done"


def test_stream_interval_coalesces_chunks_and_keeps_every_byte(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(
        daemons,
        tmp_path,
        amqtt_broker.port,
        probe,
        runtime={"model_path": "sim:rate=400,prefill_ms=0,tokens=200"},
        limits={"stream_interval_ms": 100},
    )
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "coalesced", "prompt": "x"}))
    final = probe.wait_json(f"{daemon.root}/response/coalesced", lambda r: True)
    chunks = [m.json() for m in probe.on(f"{daemon.root}/response/coalesced/stream")]
    assert final["usage"]["completion_tokens"] == 200
    assert 2 <= len(chunks) < 50, "200 tokens over ~0.5 s at 100 ms should make a handful of chunks"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == final["text"]


def test_stream_false_sends_only_the_final(
    amqtt_broker: EmbeddedBroker, probe: Probe, daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = launch(daemons, tmp_path, amqtt_broker.port, probe)
    probe.publish(f"{daemon.root}/prompt", json.dumps({"id": "quiet", "prompt": "x", "stream": False}))
    final = probe.wait_json(f"{daemon.root}/response/quiet", lambda r: True)
    assert final["state"] == "done" and final["text"]
    assert not probe.on(f"{daemon.root}/response/quiet/stream")
