"""``rkllm-mqtt ask`` against a running daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_mqtt import exit_codes
from rkllm_mqtt.broker import EmbeddedBroker

from .harness import Daemon, Mosquitto, Probe, mosquitto_binary, wait_ready
from .helpers import free_port


def run_ask(
    port: int, node: str, *args: str, protocol: str = "3.1.1", stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
    env["RKLLM_MQTT_MQTT__PROTOCOL"] = protocol
    command = [sys.executable, "-m", "rkllm_mqtt", "ask", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.run(
        [*command, "--node", node, *args],
        check=False,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def daemon(amqtt_broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Daemon]:
    probe = Probe(amqtt_broker.port).start()
    running = Daemon(tmp_path, amqtt_broker.port).start()
    try:
        wait_ready(probe, running)
    finally:
        probe.stop()
    yield running
    running.stop()


def test_ask_streams_the_answer_and_exits_zero(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    result = run_ask(amqtt_broker.port, daemon.node, "What is an NPU?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[turn 1] You said: What is an NPU?.")


def test_ask_falls_back_to_311_as_the_daemon_does(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    # protocol "auto" against amqtt (3.1.1 only), reached as an external broker: MQTT 5 first, then 3.1.1.
    result = run_ask(amqtt_broker.port, daemon.node, "auto?", protocol="auto")
    assert result.returncode == 0, result.stderr
    assert "You said: auto?." in result.stdout


def test_ask_json_prints_the_final_response(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    result = run_ask(amqtt_broker.port, daemon.node, "--json", "--max-new-tokens", "3", "Hi")
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout)
    assert final["state"] == "done" and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 3


def test_ask_reports_an_error_and_exits_non_zero(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    result = run_ask(amqtt_broker.port, daemon.node, "x" * 20000)
    assert result.returncode == exit_codes.REQUEST_FAILED
    assert "prompt_too_long" in result.stderr


def test_ask_names_an_unknown_node_and_the_nodes_it_can_see(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    # No --timeout: the default is 300 s, and the answer must come from the missing availability, not a timeout.
    result = run_ask(amqtt_broker.port, "nobody-home", "anyone?")
    assert result.returncode == exit_codes.NODE_OFFLINE, result.stderr
    assert "node 'nobody-home' is unknown" in result.stderr
    assert "rkllm/nobody-home/availability" in result.stderr
    assert f"{daemon.node} (online)" in result.stderr


def test_ask_says_at_once_that_the_node_is_offline(amqtt_broker: EmbeddedBroker, tmp_path: Path) -> None:
    probe = Probe(amqtt_broker.port).start()
    stopped = Daemon(tmp_path, amqtt_broker.port).start()
    try:
        wait_ready(probe, stopped)
        assert stopped.stop() == 0
        probe.wait_for(lambda msgs: any(m.payload == b"offline" for m in msgs))
    finally:
        probe.stop()
    result = run_ask(amqtt_broker.port, stopped.node, "hello?")
    assert result.returncode == exit_codes.NODE_OFFLINE, result.stderr
    assert f"node '{stopped.node}' is offline ({stopped.root}/availability)" in result.stderr


def test_ask_stops_waiting_when_the_node_goes_offline(amqtt_broker: EmbeddedBroker, tmp_path: Path) -> None:
    probe = Probe(amqtt_broker.port).start()
    slow = Daemon(tmp_path, amqtt_broker.port, runtime={"model_path": "sim:rate=2,prefill_ms=0,tokens=1000"}).start()
    try:
        wait_ready(probe, slow)
        probe.subscribe(f"{slow.root}/state")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
        env["RKLLM_MQTT_MQTT__PROTOCOL"] = "3.1.1"
        command = [sys.executable, "-m", "rkllm_mqtt", "ask", "--port", str(amqtt_broker.port), "--node", slow.node]
        asker = subprocess.Popen([*command, "long"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        probe.wait_json(f"{slow.root}/state", lambda s: s.get("status") == "busy")
        assert slow.proc is not None
        slow.proc.kill()  # the broker publishes the bridge's Last Will: availability offline
        _out, err = asker.communicate(timeout=60)
    finally:
        slow.stop()
        probe.stop()
    assert asker.returncode == exit_codes.NODE_OFFLINE, err
    assert "went offline before answering" in err


def test_ask_timeout_is_the_whole_wait(amqtt_broker: EmbeddedBroker) -> None:
    # A node that says online but never answers: --timeout bounds the wait, and the message says so.
    node = "silent-node"
    probe = Probe(amqtt_broker.port).start()
    try:
        probe.publish(f"rkllm/{node}/availability", b"online", retain=True)
        result = run_ask(amqtt_broker.port, node, "--timeout", "0.5", "anyone?")
    finally:
        probe.stop()
    assert result.returncode == exit_codes.NO_ANSWER, result.stderr
    assert "no answer within 0.5 s" in result.stderr


def test_ask_cannot_reach_the_broker() -> None:
    result = run_ask(free_port(), "any", "hello?")
    assert result.returncode == exit_codes.BROKER_UNREACHABLE
    assert "not reachable" in result.stderr


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_ask_over_mqtt5_uses_a_response_topic(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    probe = Probe(broker.port, v5=True).start()
    bridge = Daemon(tmp_path, broker.port, mqtt={"protocol": "5"}).start()
    try:
        wait_ready(probe, bridge)
        probe.subscribe("rkllm/reply/#")
        result = run_ask(broker.port, bridge.node, "over five", protocol="auto")
        assert result.returncode == 0, result.stderr
        assert "You said: over five." in result.stdout
        finals = [m for m in probe.messages if m.topic.startswith("rkllm/reply/ask-") and m.topic.count("/") == 2]
        assert len(finals) == 1 and finals[0].json()["state"] == "done"
    finally:
        bridge.stop()
        probe.stop()
        broker.stop()


def test_a_chunk_repeated_after_a_reconnect_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    from paho.mqtt.client import MQTTMessage

    from rkllm_mqtt.ask import _Session
    from rkllm_mqtt.topics import ReplyTopics, Topics

    topics = Topics("rkllm", "node")
    session = _Session(topics, "q1", print_stream=True)
    session.reply = ReplyTopics(topics.response("q1"))

    def chunk(seq: int, text: str) -> MQTTMessage:
        message = MQTTMessage(topic=session.reply.stream.encode() if session.reply else b"")
        message.payload = json.dumps({"id": "q1", "seq": seq, "text": text}).encode()
        return message

    # QoS 1 is at least once: after a reconnect the broker may deliver chunk 1 again.
    for seq, text in [(0, "a"), (1, "b"), (1, "b"), (2, "c"), (0, "a")]:
        session.on_message(None, None, chunk(seq, text))  # type: ignore[arg-type]
    assert capsys.readouterr().out == "abc"
    assert session.printed == "abc"


def test_ask_stops_quietly_when_its_reader_goes(amqtt_broker: EmbeddedBroker, daemon: Daemon) -> None:
    # `rkllm-mqtt ask ... | head`: the reader closes the pipe; ask must not wait out its timeout or print a traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first chunk is written
    try:
        result = run_ask(amqtt_broker.port, daemon.node, "--max-new-tokens", "20", "Tell me a story", stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == exit_codes.OUTPUT_CLOSED, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
