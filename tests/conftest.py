"""Shared fixtures: a real MQTT broker (amqtt, embedded) on a free loopback port, and unique topics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rkllm_mqtt.broker import EmbeddedBroker

from .helpers import free_port


# A fresh broker per test: amqtt keeps the persistent sessions of every daemon that ever connected and sends
# every retained message to each new subscription, so a long-lived one slows down as the tests go on.
@pytest.fixture
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    yield broker
    broker.stop()
