"""Reading the broker's PUBLISH packets straight from the receive buffer, without paho's per-packet machinery.

paho handles an incoming PUBLISH in a dozen Python calls: three reads for the fixed header and the body, a packet
dict updated field by field, struct formats built per packet, an ``MQTTMessage``, a ``Properties`` object decoded
property by property, a walk of its callback table. In a flood that was where the daemon's network thread spent its
time, and a request sent after the flood waits until that thread has read everything ahead of it on the connection.

Here a complete PUBLISH of QoS 0 or 1 found in the buffer is decoded in one pass into the few fields the bridge
uses. Anything else, or anything unusual in a PUBLISH (a property a PUBLISH may not carry, a topic alias, a topic
that is not UTF-8, a packet cut at the end of the buffer), is left where it is for paho, which handles it as it
always did: this is a faster way through for the common packet, never a second MQTT implementation with its own
answers to odd input.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH = 0x30
_MAX_LENGTH_BYTES = 4  # a Remaining Length takes at most four bytes (MQTT 3.1.1 and 5, 2.2.3 / 1.5.5)

# MQTT 5 PUBLISH properties (3.3.2.3), by how their values are encoded.
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_USER_PROPERTY = 0x26
_ONE_BYTE = {0x01}  # Payload Format Indicator
_FOUR_BYTES = {0x02}  # Message Expiry Interval
_STRING = {0x03, _RESPONSE_TOPIC}  # Content Type, Response Topic
_VARIABLE_INT = {0x0B}  # Subscription Identifier (may repeat)
# Left to paho: Topic Alias (0x23), which this client never allows the broker to use, and any other identifier.


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int  # 0 for QoS 0
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


def complete_packet(buffer: bytes, pos: int) -> tuple[int, int, int] | None:
    """(first byte, start of the body, end of the packet) of the packet at ``pos``, when all of it is in
    ``buffer``; None when it is cut off, or when its length is malformed (paho reports that)."""
    end = len(buffer)
    index = pos + 1
    length = 0
    shift = 0
    while True:
        if index >= end or index - pos > _MAX_LENGTH_BYTES:
            return None
        byte = buffer[index]
        length |= (byte & 0x7F) << shift
        shift += 7
        index += 1
        if not byte & 0x80:
            break
    if index + length > end:
        return None
    return buffer[pos], index, index + length


def encode_length(length: int) -> bytes:
    """A Remaining Length as MQTT writes it, what :func:`complete_packet` reads (tests and benchmarks build
    packets with it)."""
    out = bytearray()
    while True:
        length, byte = divmod(length, 128)
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def decode_publish(first_byte: int, body: bytes, *, v5: bool) -> Publish | None:
    """The PUBLISH whose fixed header starts with ``first_byte``, or None to leave it to paho."""
    if first_byte & 0xF0 != PUBLISH:
        return None
    qos = (first_byte >> 1) & 0x03
    if qos > 1 or len(body) < 2:
        return None
    topic_end = 2 + int.from_bytes(body[0:2], "big")
    position = topic_end + (2 if qos else 0)
    if position > len(body) or (topic_end == 2 and not v5):
        return None
    try:
        topic = body[2:topic_end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    mid = int.from_bytes(body[topic_end:position], "big") if qos else 0
    response_topic: str | None = None
    correlation: bytes | None = None
    user: list[tuple[str, str]] = []
    if v5:
        parsed = _properties(body, position)
        if parsed is None:
            return None
        position, response_topic, correlation, user = parsed
    if not topic:  # an empty topic is only valid with a topic alias, which is left to paho
        return None
    return Publish(
        topic=topic,
        payload=body[position:],
        qos=qos,
        retain=bool(first_byte & 0x01),
        dup=bool(first_byte & 0x08),
        mid=mid,
        response_topic=response_topic,
        correlation_data=correlation,
        user_properties=tuple(user),
    )


def _properties(body: bytes, position: int) -> tuple[int, str | None, bytes | None, list[tuple[str, str]]] | None:
    """The end of the property block at ``position`` and the properties the bridge reads; None when unusual."""
    total = _variable_int(body, position)
    if total is None:
        return None
    length, position = total
    end = position + length
    if end > len(body):
        return None
    response_topic: str | None = None
    correlation: bytes | None = None
    user: list[tuple[str, str]] = []
    try:
        while position < end:
            identifier = body[position]
            position += 1
            if identifier in _ONE_BYTE:
                position += 1
            elif identifier in _FOUR_BYTES:
                position += 4
            elif identifier in _VARIABLE_INT:
                value = _variable_int(body, position)
                if value is None:
                    return None
                position = value[1]
            elif identifier in _STRING:
                text, position = _string(body, position, end)
                if identifier == _RESPONSE_TOPIC:
                    response_topic = text
            elif identifier == _CORRELATION_DATA:
                size = int.from_bytes(body[position : position + 2], "big")
                if position + 2 + size > end:
                    return None
                correlation = body[position + 2 : position + 2 + size]
                position += 2 + size
            elif identifier == _USER_PROPERTY:
                key, position = _string(body, position, end)
                value_text, position = _string(body, position, end)
                user.append((key, value_text))
            else:
                return None
    except (ValueError, UnicodeDecodeError):
        return None
    if position != end:
        return None
    return end, response_topic, correlation, user


def _string(body: bytes, position: int, end: int) -> tuple[str, int]:
    size = int.from_bytes(body[position : position + 2], "big")
    if position + 2 + size > end:
        raise ValueError("a string runs past the properties")
    return body[position + 2 : position + 2 + size].decode("utf-8"), position + 2 + size


def _variable_int(body: bytes, position: int) -> tuple[int, int] | None:
    value = 0
    shift = 0
    for index in range(position, min(position + _MAX_LENGTH_BYTES, len(body))):
        byte = body[index]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index + 1
    return None
