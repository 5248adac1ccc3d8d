"""TLS and mutual TLS against Mosquitto's own listeners, for serve, ask and doctor alike.

A throwaway CA signs two server certificates (one for 127.0.0.1, one for another name) and a client certificate;
one Mosquitto serves a plain listener (for the test's own probe) and three TLS listeners.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rkllm_mqtt import doctor as d
from rkllm_mqtt import exit_codes
from rkllm_mqtt.settings import Settings

from .harness import Daemon, Probe, mosquitto_binary, wait_ready
from .helpers import free_port

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None or shutil.which("openssl") is None, reason="needs mosquitto and openssl"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(name: str, subject: str, san: str, cwd: Path, *, client: bool = False) -> None:
    """``name``.key and ``name``.pem, signed by the CA in ``cwd``."""
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", subject,
             "-out", f"{name}.csr", cwd=cwd)  # fmt: skip
    usage = "clientAuth" if client else "serverAuth"
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd)  # fmt: skip


@dataclass
class TlsBroker:
    dir: Path
    plain: int  # no TLS: the test's own probe
    tls: int  # server certificate for 127.0.0.1
    mutual: int  # the same, and a client certificate is required
    wrong_name: int  # server certificate for broker.invalid only

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    work = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=rkllm-mqtt test CA", cwd=work)  # fmt: skip
    _issue("server", "/CN=127.0.0.1", "IP:127.0.0.1,DNS:localhost", work)
    _issue("elsewhere", "/CN=broker.invalid", "DNS:broker.invalid", work)
    _issue("client", "/CN=rkllm-bridge", "DNS:rkllm-bridge", work, client=True)
    broker = TlsBroker(work, free_port(), free_port(), free_port(), free_port())
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {broker.plain} 127.0.0.1\nallow_anonymous true\n"
        f"listener {broker.tls} 127.0.0.1\ncafile {broker.ca}\ncertfile {work}/server.pem\nkeyfile {work}/server.key\n"
        f"listener {broker.mutual} 127.0.0.1\ncafile {broker.ca}\ncertfile {work}/server.pem\n"
        f"keyfile {work}/server.key\nrequire_certificate true\n"
        f"listener {broker.wrong_name} 127.0.0.1\ncafile {broker.ca}\ncertfile {work}/elsewhere.pem\n"
        f"keyfile {work}/elsewhere.key\n"
        "persistence false\nlog_dest none\n" + ("user root\n" if os.geteuid() == 0 else "")
    )
    binary = mosquitto_binary()
    assert binary is not None
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for port in (broker.plain, broker.tls, broker.mutual, broker.wrong_name):
            _wait_listening(port)
        yield broker
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as attempt:
            if attempt.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto does not listen on {port}")


def _mqtt(broker: TlsBroker, port: int, *, ca: bool = True, client_cert: bool = False, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"host": "127.0.0.1", "port": port, "tls": True, "protocol": "auto", **extra}
    if ca:
        section["tls_ca_file"] = str(broker.ca)
    if client_cert:
        section["tls_cert_file"] = str(broker.client_cert)
        section["tls_key_file"] = str(broker.client_key)
    return section


def _ask(
    tmp_path: Path, mqtt: dict[str, Any], node: str, prompt: str = "hello over TLS"
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"ask-{mqtt['port']}-{len(list(tmp_path.iterdir()))}.toml"
    config.write_text("[mqtt]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in mqtt.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
    return subprocess.run(
        [sys.executable, "-m", "rkllm_mqtt", "ask", "--config", str(config), "--node", node, prompt],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("listener", ["tls", "mutual"])
def test_serve_ask_and_doctor_connect_the_same_way(tls_broker: TlsBroker, tmp_path: Path, listener: str) -> None:
    port = getattr(tls_broker, listener)
    mqtt = _mqtt(tls_broker, port, client_cert=listener == "mutual")
    doctor = d.check_broker(Settings(mqtt=mqtt))
    assert doctor.status == "PASS", doctor.render()
    assert "over TLS" in doctor.detail and "MQTT 5" in doctor.detail
    probe = Probe(tls_broker.plain).start()
    bridge = Daemon(tmp_path, port, mqtt=mqtt).start()
    try:
        wait_ready(probe, bridge)  # serve connected over TLS: its retained health reached the plain listener
        result = _ask(tmp_path, mqtt, bridge.node)
        assert result.returncode == exit_codes.OK, result.stderr
        assert "You said: hello over TLS." in result.stdout
    finally:
        bridge.stop()
        probe.stop()


def test_mutual_tls_without_a_client_certificate_fails_in_ask_and_doctor(tls_broker: TlsBroker, tmp_path: Path) -> None:
    mqtt = _mqtt(tls_broker, tls_broker.mutual)
    doctor = d.check_broker(Settings(mqtt=mqtt), timeout=3.0)
    assert doctor.status == "FAIL", doctor.render()
    assert doctor.hint is not None and "tls_cert_file" in doctor.hint
    assert _ask(tmp_path, mqtt, "any").returncode == exit_codes.BROKER_UNREACHABLE


def test_tls_insecure_skips_the_host_name_check_only(tls_broker: TlsBroker, tmp_path: Path) -> None:
    checked = _mqtt(tls_broker, tls_broker.wrong_name)
    doctor = d.check_broker(Settings(mqtt=checked))
    assert doctor.status == "FAIL" and "not trusted" in doctor.detail, doctor.render()
    refused = _ask(tmp_path, checked, "any")
    assert refused.returncode == exit_codes.BROKER_UNREACHABLE, refused.stderr

    insecure = _mqtt(tls_broker, tls_broker.wrong_name, tls_insecure=True)
    doctor = d.check_broker(Settings(mqtt=insecure))
    assert doctor.status == "PASS", doctor.render()
    probe = Probe(tls_broker.plain).start()
    bridge = Daemon(tmp_path, tls_broker.wrong_name, mqtt=insecure).start()
    try:
        wait_ready(probe, bridge)
        answered = _ask(tmp_path, insecure, bridge.node)
        assert answered.returncode == exit_codes.OK, answered.stderr
    finally:
        bridge.stop()
        probe.stop()

    # The chain is still verified: without the CA (system CAs only) nothing connects, tls_insecure or not.
    untrusted = _mqtt(tls_broker, tls_broker.wrong_name, ca=False, tls_insecure=True)
    doctor = d.check_broker(Settings(mqtt=untrusted))
    assert doctor.status == "FAIL" and "not trusted" in doctor.detail, doctor.render()
    assert _ask(tmp_path, untrusted, "any").returncode == exit_codes.BROKER_UNREACHABLE
