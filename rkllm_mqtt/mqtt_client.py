"""The one place an MQTT client is built and a short connection is opened: ``serve``, ``ask`` and ``doctor``
reach the broker the same way.

- **Credentials**: sent when ``username`` or a password (``password`` / ``password_file``) is set.
- **TLS**: on with ``tls`` or ``tls_ca_file``; the broker's chain is verified against ``tls_ca_file``, or the
  system's CAs without one. ``tls_cert_file``/``tls_key_file`` add a client certificate (mutual TLS).
  ``tls_insecure`` skips the host-name check only: the chain is still verified (what paho's
  ``tls_insecure_set`` means). A broker with a self-signed certificate needs its CA in ``tls_ca_file``.
- **Protocol**: ``"auto"`` tries MQTT 5, then 3.1.1 when the broker refuses 5, closes the connection or does
  not answer; the embedded broker speaks 3.1.1 only and is spoken to in 3.1.1 straight away.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from rkllm_mqtt.errors import ConfigError
from rkllm_mqtt.settings import MqttSettings

Protocol = Literal["5", "3.1.1"]
ClientT = TypeVar("ClientT", bound=mqtt.Client)

# CONNACK reason codes that mean "this broker does not speak this protocol" (3.1.1's 1, MQTT 5's 0x84).
PROTOCOL_REFUSED = frozenset({1, 0x84})
# CONNACK reason codes of a refused login (3.1.1: 4 bad user name or password, 5 not authorised; MQTT 5: 0x86, 0x87).
LOGIN_REFUSED = frozenset({4, 5, 0x86, 0x87})


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The TLS context of every connection to the broker; raises OSError/ssl.SSLError for unreadable files."""
    context = ssl.create_default_context(cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None)
    if settings.tls_cert_file is not None:
        context.load_cert_chain(
            str(settings.tls_cert_file), str(settings.tls_key_file) if settings.tls_key_file else None
        )
    if settings.tls_insecure:
        # Only the name in the certificate may differ from mqtt.host; the chain must still be trusted.
        context.check_hostname = False
    return context


def credentials(settings: MqttSettings) -> tuple[str | None, str | None] | None:
    """User name and password to send, or None for an anonymous login. Raises ConfigError (password file)."""
    password = settings.resolved_password()
    if settings.username is None and password is None:
        return None
    return settings.username, password.get_secret_value() if password is not None else None


def protocols(settings: MqttSettings, *, embedded: bool) -> list[Protocol]:
    """The protocols to try, in order."""
    if embedded:
        return ["3.1.1"]
    if settings.protocol == "auto":
        return ["5", "3.1.1"]
    return [settings.protocol]


def build_client(
    settings: MqttSettings,
    *,
    client_id: str,
    protocol: Protocol,
    persistent: bool = False,
    reconnect_on_failure: bool = True,
    client_class: type[ClientT] = mqtt.Client,  # type: ignore[assignment]
) -> ClientT:
    """A paho client with the credentials and TLS of ``settings``; not connected yet."""
    v5 = protocol == "5"
    client = client_class(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        # MQTT 5 sets the session's lifetime at connect time instead (clean_start, session expiry).
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=reconnect_on_failure,
    )
    login = credentials(settings)
    if login is not None:
        client.username_pw_set(*login)
    if settings.uses_tls:
        client.tls_set_context(tls_context(settings))
    return client


# -- a short connection, for the commands that connect once (ask, doctor) --------------------------------------


class ConnectError(Exception):
    """The broker could not be used; ``detail`` says what happened, ``hint`` what to do about it."""

    def __init__(self, detail: str, hint: str | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


@dataclass
class Connection:
    """A connected client, driven by the caller's thread (``client.loop()``) until ``loop_start()``."""

    client: mqtt.Client
    protocol: Protocol
    connack: Any = None
    lost: bool = False
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop(timeout=0.1)


def where(settings: MqttSettings, host: str, port: int) -> str:
    return f"{'mqtts' if settings.uses_tls else 'mqtt'}://{host}:{port}"


def _probe_tcp(host: str, port: int, place: str, timeout: float) -> None:
    """Plain TCP first, so "not reachable" is never confused with a TLS or MQTT problem."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise ConnectError(f"{place}: host name not resolved ({exc.strerror})", "check mqtt.host") from exc
    except ConnectionRefusedError as exc:
        raise ConnectError(
            f"{place}: not reachable, connection refused (nothing listens there)",
            "check mqtt.host and mqtt.port, and that the broker runs",
        ) from exc
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or exc.__class__.__name__)
        raise ConnectError(
            f"{place}: not reachable ({reason})",
            "check mqtt.host and mqtt.port, the network and any firewall between here and the broker",
        ) from exc


def _attempt(
    settings: MqttSettings,
    *,
    host: str,
    port: int,
    protocol: Protocol,
    client_id: str,
    deadline: float,
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None,
) -> Connection:
    client: mqtt.Client = build_client(
        settings, client_id=client_id, protocol=protocol, reconnect_on_failure=False, client_class=mqtt.Client
    )
    connection = Connection(client, protocol)

    def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        connection.connack = reason_code

    def on_disconnect(_c: Any, _u: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        connection.lost = True

    def record(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        connection.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message or record
    client.connect_timeout = max(0.5, deadline - time.monotonic())
    client.connect(host, port, keepalive=settings.keepalive_s)
    while connection.connack is None and not connection.lost and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            connection.lost = True
    return connection


def connect(
    settings: MqttSettings,
    *,
    host: str,
    port: int,
    embedded: bool,
    client_id: str,
    timeout: float,
    on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
) -> Connection:
    """Connect once, falling back from MQTT 5 to 3.1.1 as the daemon does; ConnectError says why not."""
    place = where(settings, host, port)
    tries = protocols(settings, embedded=embedded)
    deadline = time.monotonic() + timeout
    _probe_tcp(host, port, place, timeout)
    for index, protocol in enumerate(tries):
        last = index == len(tries) - 1
        # "auto" leaves the fallback half of the time: a broker may ignore an MQTT 5 CONNECT.
        attempt_deadline = deadline if last else time.monotonic() + timeout / 2
        try:
            connection = _attempt(
                settings,
                host=host,
                port=port,
                protocol=protocol,
                client_id=client_id,
                deadline=attempt_deadline,
                on_message=on_message,
            )
        except ConfigError as exc:
            raise ConnectError(f"{place}: {exc}", "fix mqtt.password_file") from exc
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"{place}: TLS error, the broker's certificate is not trusted: {exc.verify_message}",
                "set mqtt.tls_ca_file to the CA that signed the broker's certificate; check mqtt.host "
                "(mqtt.tls_insecure skips the host-name check only)",
            ) from exc
        except ssl.SSLError as exc:
            raise ConnectError(
                f"{place}: TLS error: {exc.reason or exc}",
                "check that the port speaks TLS (usually 8883), and mqtt.tls_cert_file / mqtt.tls_key_file "
                "when the broker asks for a client certificate",
            ) from exc
        except OSError as exc:
            if settings.uses_tls and isinstance(exc, TimeoutError):
                raise ConnectError(
                    f"{place}: TLS error: the TCP connection opens but the TLS handshake gets no answer",
                    "this port does not seem to speak TLS: use the broker's TLS port (usually 8883)",
                ) from exc
            reason = exc.strerror or exc.__class__.__name__
            if settings.uses_tls and "EOF" in str(exc):
                reason = f"the broker closed the TLS connection ({exc})"
            raise ConnectError(
                f"{place}: connection failed after TCP connected ({reason})",
                "check that this port is an MQTT broker"
                + (" speaking TLS, and whether it wants a client certificate" if settings.uses_tls else ""),
            ) from exc
        code = connection.connack
        if code is None:
            connection.close()
            if not last:
                continue
            what = "closed the connection" if connection.lost else f"did not answer within {timeout:.0f} s"
            hint = "check that this port is an MQTT broker (not TLS, not websockets) and mqtt.protocol"
            if settings.uses_tls and settings.tls_cert_file is None and connection.lost:
                hint = (
                    "a broker that requires a client certificate closes the connection without one: set "
                    "mqtt.tls_cert_file and mqtt.tls_key_file; " + hint
                )
            raise ConnectError(f"{place}: reachable, but the broker {what} (MQTT {protocol})", hint)
        value = int(code.value)
        if value == 0:
            return connection
        connection.close()
        if value in PROTOCOL_REFUSED and not last:
            continue
        if value in LOGIN_REFUSED:
            login = f"as {settings.username!r}" if settings.username else "without credentials"
            raise ConnectError(
                f"{place}: login refused {login} ({code})",
                "check mqtt.username and mqtt.password / mqtt.password_file",
            )
        raise ConnectError(
            f"{place}: connection refused by the broker ({code})",
            'set mqtt.protocol = "auto" or "3.1.1"' if value in PROTOCOL_REFUSED else None,
        )
    raise ConnectError(f"{place}: no MQTT protocol to try", None)  # pragma: no cover - tries is never empty
