"""The one builder of MQTT clients: the rules serve, ask and doctor share."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt

from rkllm_mqtt.mqtt_client import build_client, credentials, protocols, tls_context
from rkllm_mqtt.settings import MqttSettings


def test_credentials_are_sent_with_a_user_name_or_a_password_alone(tmp_path: Path) -> None:
    assert credentials(MqttSettings(host="b")) is None
    assert credentials(MqttSettings(host="b", username="u")) == ("u", None)
    assert credentials(MqttSettings(host="b", password="p")) == (None, "p")
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    assert credentials(MqttSettings(host="b", username="u", password="p", password_file=secret)) == ("u", "from-file")


def test_tls_insecure_skips_the_host_name_only() -> None:
    checked = tls_context(MqttSettings(host="b", tls=True))
    assert checked.check_hostname is True and checked.verify_mode == ssl.CERT_REQUIRED
    insecure = tls_context(MqttSettings(host="b", tls=True, tls_insecure=True))
    assert insecure.check_hostname is False
    assert insecure.verify_mode == ssl.CERT_REQUIRED, "the chain is still verified"


def test_protocols_follow_the_setting_and_the_embedded_broker() -> None:
    assert protocols(MqttSettings(host="b"), embedded=False) == ["5", "3.1.1"]
    assert protocols(MqttSettings(host="b", protocol="3.1.1"), embedded=False) == ["3.1.1"]
    assert protocols(MqttSettings(host="b", protocol="5"), embedded=False) == ["5"]
    assert protocols(MqttSettings(), embedded=True) == ["3.1.1"]


def test_the_built_client_carries_the_protocol_and_session_kind() -> None:
    class Custom(mqtt.Client):
        pass

    client = build_client(MqttSettings(host="b"), client_id="x", protocol="3.1.1", persistent=True, client_class=Custom)
    assert isinstance(client, Custom)
    assert client.protocol == mqtt.MQTTv311
    v5 = build_client(MqttSettings(host="b"), client_id="y", protocol="5")
    assert v5.protocol == mqtt.MQTTv5
