"""Shared fixtures: a real MQTT broker (amqtt, embedded) on a free loopback port, and unique topics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rkllm_mqtt.broker import EmbeddedBroker

from .helpers import free_port


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    yield broker
    broker.stop()
