"""The last check before a PUBLISH goes to paho: would the broker take it, or close the connection over it?

A QoS 1 message paho has accepted stays in its session and is sent again after every reconnect. A message the
broker refuses as malformed (a control character in the topic, a packet above the broker's maximum size) closes
the connection each time it is sent: accepted once, it would cut the bridge off its broker for good. So nothing
is handed to paho that this module finds a problem with. Pure functions, no I/O.
"""

from __future__ import annotations

import functools

from rkllm_mqtt.topics import MQTT_MAX_TOPIC_BYTES, topic_name_problem

# MQTT's Remaining Length is a variable byte integer of at most four bytes; with the first byte, a packet is at most
# 5 bytes longer.
MQTT_MAX_REMAINING_LENGTH = 268_435_455
MQTT_MAX_PACKET_BYTES = 1 + 4 + MQTT_MAX_REMAINING_LENGTH
# Binary data in an MQTT 5 property (Correlation Data) has a 16-bit length.
MQTT_MAX_BINARY_BYTES = 65535
# Everything of a PUBLISH but its payload: fixed header, topic, packet id and the two properties at their largest.
_MAX_OVERHEAD_BYTES = 5 + 2 + MQTT_MAX_TOPIC_BYTES + 2 + 4 + 3 + MQTT_MAX_BINARY_BYTES + 3 + MQTT_MAX_TOPIC_BYTES
# Topics up to this length are remembered once checked: a stream publishes to the same topic for every token.
_REMEMBERED_TOPIC_CHARS = 512


@functools.lru_cache(maxsize=1024)
def _remembered_topic_problem(topic: str) -> str | None:
    return topic_name_problem(topic)


def forget_checked_topics() -> None:
    """Empty the cache of checked topics. After a flood it holds the reply topics of the last requests answered,
    which nothing will publish to again; scattered through the memory the flood used, they keep it allocated."""
    _remembered_topic_problem.cache_clear()


def _topic_problem(topic: str) -> str | None:
    if len(topic) <= _REMEMBERED_TOPIC_CHARS:
        return _remembered_topic_problem(topic)
    return topic_name_problem(topic)


def _varint_size(value: int) -> int:
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size


def publish_packet_size(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    v5: bool,
    correlation_data: bytes | None = None,
    response_topic: str | None = None,
    expires: bool = False,
) -> int:
    """Bytes of the PUBLISH packet paho builds for this message (fixed header included), as MQTT counts them."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + len(payload)
    if v5:
        properties = 1 + 4 if expires else 0  # Message Expiry Interval: identifier and a four-byte integer
        if correlation_data is not None:
            properties += 1 + 2 + len(correlation_data)
        if response_topic is not None:
            properties += 1 + 2 + len(response_topic.encode("utf-8"))
        remaining += _varint_size(properties) + properties
    return 1 + _varint_size(remaining) + remaining


def publish_problem(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    v5: bool,
    correlation_data: bytes | None = None,
    response_topic: str | None = None,
    max_packet_bytes: int | None = None,
    expires: bool = False,
) -> str | None:
    """Why the broker would refuse this PUBLISH (and drop the connection), or None when it takes it.

    ``max_packet_bytes`` is the Maximum Packet Size of the broker's MQTT 5 CONNACK, None when it set none.
    ``correlation_data`` and ``response_topic`` count only on MQTT 5, where they are sent as properties.
    """
    problem = _topic_problem(topic)
    if problem is not None:
        return f"topic {problem}"
    if v5 and response_topic is not None:
        problem = _topic_problem(response_topic)
        if problem is not None:
            return f"response topic property {problem}"
    if v5 and correlation_data is not None and len(correlation_data) > MQTT_MAX_BINARY_BYTES:
        return f"correlation data is {len(correlation_data)} bytes; MQTT allows {MQTT_MAX_BINARY_BYTES}"
    if max_packet_bytes is None and len(payload) <= MQTT_MAX_REMAINING_LENGTH - _MAX_OVERHEAD_BYTES:
        return None  # no broker limit, and far below MQTT's: nothing to count
    size = publish_packet_size(
        topic,
        payload,
        qos=qos,
        v5=v5,
        correlation_data=correlation_data,
        response_topic=response_topic,
        expires=expires,
    )
    limit = MQTT_MAX_PACKET_BYTES if max_packet_bytes is None else max_packet_bytes
    if size > limit:
        whose = "MQTT's limit" if max_packet_bytes is None else "the broker's maximum packet size"
        return f"the packet is {size} bytes; {whose} is {limit}"
    return None
