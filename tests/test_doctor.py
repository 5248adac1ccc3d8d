"""``rkllm-mqtt doctor``: the command end to end on this machine, and each check on its own.

The machine running the tests has no Rockchip NPU, so the command must say exactly that; the NPU
checks are also driven through fake sysfs/dev trees to cover what a board would show.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rkllm_mqtt import doctor as d
from rkllm_mqtt import exit_codes
from rkllm_mqtt.broker import EmbeddedBroker
from rkllm_mqtt.settings import Settings

from .harness import Mosquitto, Probe, mosquitto_binary
from .helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def _on_rockchip_board() -> bool:
    return bool(d.find_npu_nodes()) or Path("/dev/rknpu").exists()


def run_doctor(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "rkllm_mqtt", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )


def line(output: str, name: str) -> str:
    """The result line of check ``name`` (status first)."""
    for text in output.splitlines():
        if text[:4] in ("PASS", "FAIL", "WARN", "SKIP") and text[6:].startswith(f"{name}:"):
            return text
    raise AssertionError(f"no line for {name!r} in:\n{output}")


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", free_port())
    embedded.start()
    yield embedded
    embedded.stop()


# -- the command -------------------------------------------------------------------------------


def test_doctor_on_this_machine_with_sim_and_broker(tmp_path: Path, broker: EmbeddedBroker) -> None:
    config = write_config(
        tmp_path,
        f"""
[mqtt]
host = "127.0.0.1"
port = {broker.port}

[runtime]
library = "sim"
""",
    )
    result = run_doctor(config)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    assert line(out, "config").startswith("PASS")
    assert str(config) in line(out, "config")

    library = line(out, "runtime library")
    assert library.startswith("PASS")
    assert "sim: the bundled simulated runtime" in library
    assert "loads with dlopen" in library

    abi = line(out, "runtime ABI")
    assert abi.startswith("PASS")
    assert "layout 1.3" in abi and "rkllm-runtime version 1.3.0" in abi

    assert line(out, "model").startswith("PASS")

    npu = line(out, "NPU device")
    driver = line(out, "NPU driver")
    if not _on_rockchip_board():
        assert npu.startswith("SKIP")
        assert "no NPU device found" in npu and "has no Rockchip NPU" in npu
        assert "not needed with the simulated runtime" in npu
        assert driver.startswith("SKIP")

    broker_line = line(out, "broker")
    assert broker_line.startswith("PASS"), broker_line
    assert f"mqtt://127.0.0.1:{broker.port}: connected" in broker_line
    # amqtt speaks MQTT 3.1.1 only: "auto" must have fallen back.
    assert "MQTT 3.1.1" in broker_line

    assert line(out, "Home Assistant")[:4] in ("WARN", "PASS")
    assert out.rstrip().splitlines()[-1].startswith("summary: ")


def test_doctor_fails_on_a_missing_library(tmp_path: Path) -> None:
    model = tmp_path / "model.rkllm"
    model.write_bytes(b"\0" * 128)
    missing = tmp_path / "nowhere" / "librkllmrt.so"
    config = write_config(
        tmp_path,
        f"""
[mqtt]
port = {free_port()}

[runtime]
library = "{missing}"
model_path = "{model}"
""",
    )
    result = run_doctor(config)
    assert result.returncode == exit_codes.CHECK_FAILED, result.stdout + result.stderr
    library = line(result.stdout, "runtime library")
    assert library.startswith("FAIL")
    assert str(missing) in library
    assert "hint: install librkllmrt.so" in result.stdout
    assert line(result.stdout, "runtime ABI").startswith("SKIP")
    if not _on_rockchip_board():
        # Not simulated: a missing NPU is now a failure, and said so truthfully.
        npu = line(result.stdout, "NPU device")
        assert npu.startswith("FAIL") and "no NPU device found" in npu


def test_doctor_fails_when_no_broker_listens(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
    result = run_doctor(config)
    assert result.returncode == exit_codes.CHECK_FAILED, result.stdout + result.stderr
    broker_line = line(result.stdout, "broker")
    assert broker_line.startswith("FAIL")
    assert f"127.0.0.1:{port}" in broker_line and "not reachable" in broker_line
    assert line(result.stdout, "Home Assistant").startswith("SKIP")


# -- driver version ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RKNPU driver: v0.9.6", (0, 9, 6)),
        ("RKNPU driver: v0.9.8\n", (0, 9, 8)),
        ("0.9.7\n", (0, 9, 7)),
        ("rknpu driver: V0.10.1", (0, 10, 1)),
        ("no version here", None),
        ("", None),
    ],
)
def test_parse_driver_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert d.parse_driver_version(text) == expected


def test_old_driver_is_a_failure_with_the_reason() -> None:
    version = d.parse_driver_version("RKNPU driver: v0.9.6")
    assert version is not None
    result = d.judge_driver_version(version, "/sys/kernel/debug/rknpu/version")
    assert result.status == "FAIL"
    assert "too old" in result.detail and "v0.9.6" in result.detail
    assert result.hint is not None and "inference fails" in result.hint


def test_supported_drivers_pass() -> None:
    assert d.judge_driver_version((0, 9, 8), "x").status == "PASS"
    recommended = d.judge_driver_version((0, 9, 7), "x")
    assert recommended.status == "PASS" and "0.9.8 is recommended" in recommended.detail


def test_drm_version_ioctl_number() -> None:
    # _IOWR('d', 0x00, struct drm_version): 0xC0406400 wherever pointers and size_t are 64-bit.
    if struct.calcsize("P") == 8:
        assert d.DRM_IOCTL_VERSION == 0xC0406400


# -- NPU device and driver on fake kernel trees -------------------------------------------------


def fake_tree(tmp_path: Path) -> d.SystemPaths:
    paths = d.SystemPaths(sys=tmp_path / "sys", dev=tmp_path / "dev", proc=tmp_path / "proc")
    for directory in (paths.sys / "class" / "drm", paths.dev / "dri", paths.proc):
        directory.mkdir(parents=True)
    return paths


def add_render_node(paths: d.SystemPaths, name: str, driver: str) -> Path:
    drivers = paths.sys / "bus" / "platform" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    device = paths.sys / "devices" / "platform" / f"{name}.npu"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(drivers)
    entry = paths.sys / "class" / "drm" / name
    entry.mkdir()
    (entry / "device").symlink_to(device)
    node = paths.dev / "dri" / name
    node.write_bytes(b"")
    node.chmod(0o660)
    return node


def sim_settings() -> Settings:
    return Settings(runtime={"library": "sim"})


def board_settings(tmp_path: Path) -> Settings:
    return Settings(runtime={"library": "librkllmrt.so", "model_path": str(tmp_path / "m.rkllm")})


def test_rknpu_render_node_is_found_by_its_driver(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    add_render_node(paths, "renderD128", "panfrost")  # the GPU
    node = add_render_node(paths, "renderD129", "RKNPU")
    assert d.find_npu_nodes(paths) == [d.NpuNode(node, "drm", "RKNPU")]
    result = d.check_npu_device(board_settings(tmp_path), paths)
    assert result.status == "PASS", result.render()
    assert str(node) in result.detail and "driver RKNPU" in result.detail


def test_misc_rknpu_node_is_found(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    (paths.dev / "rknpu").write_bytes(b"")
    assert d.find_npu_nodes(paths) == [d.NpuNode(paths.dev / "rknpu", "misc", "rknpu")]


def test_no_npu_on_a_rockchip_board_fails_and_names_the_soc(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    (paths.proc / "device-tree").mkdir()
    (paths.proc / "device-tree" / "compatible").write_bytes(b"xunlong,orangepi-5\0rockchip,rk3588s\0")
    result = d.check_npu_device(board_settings(tmp_path), paths)
    assert result.status == "FAIL"
    assert "rk3588s" in result.detail
    sim = d.check_npu_device(sim_settings(), paths)
    assert sim.status == "SKIP" and "not needed with the simulated runtime" in sim.detail


def test_mainline_rocket_driver_is_named(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    (paths.proc / "device-tree").mkdir()
    (paths.proc / "device-tree" / "compatible").write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    drivers = paths.sys / "bus" / "platform" / "drivers" / "rocket"
    drivers.mkdir(parents=True)
    device = paths.sys / "devices" / "platform" / "fdab0000.npu"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(drivers)
    accel = paths.sys / "class" / "accel" / "accel0"
    accel.mkdir(parents=True)
    (accel / "device").symlink_to(device)
    result = d.check_npu_device(board_settings(tmp_path), paths)
    assert result.status == "FAIL"
    assert "rocket" in result.detail
    assert result.hint is not None and "vendor rknpu driver" in result.hint


def test_no_npu_elsewhere_says_the_machine_has_none(tmp_path: Path) -> None:
    result = d.check_npu_device(board_settings(tmp_path), fake_tree(tmp_path))
    assert result.status == "FAIL"
    assert "no NPU device found: this machine" in result.detail and "has no Rockchip NPU" in result.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file: permission denial cannot be shown")
def test_node_this_user_cannot_open(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    node = add_render_node(paths, "renderD129", "RKNPU")
    node.chmod(0o000)
    result = d.check_npu_device(board_settings(tmp_path), paths)
    assert result.status in ("WARN", "FAIL")
    assert "cannot open it read-write" in result.detail


def test_mode_bits_decide_who_may_open_a_node(tmp_path: Path) -> None:
    node = tmp_path / "renderD129"
    node.write_bytes(b"")
    os.chown(node, os.getuid(), os.getgid())
    node.chmod(0o660)
    st = node.stat()
    stranger, group = 4242, 4343
    assert d._mode_allows(st, stranger, {st.st_gid}, 6)  # in the node's group
    assert not d._mode_allows(st, stranger, {group}, 6)  # not in it
    assert d._mode_allows(st, 0, set(), 6)  # root
    node.chmod(0o666)
    assert d._mode_allows(node.stat(), stranger, {group}, 6)  # world read-write


def test_driver_version_from_sysfs_module(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    add_render_node(paths, "renderD129", "RKNPU")
    (paths.sys / "module" / "rknpu").mkdir(parents=True)
    (paths.sys / "module" / "rknpu" / "version").write_text("0.9.6\n")
    result = d.check_npu_driver(board_settings(tmp_path), paths)
    assert result.status == "FAIL" and "v0.9.6" in result.detail
    assert str(paths.sys / "module" / "rknpu" / "version") in result.detail


def test_driver_version_from_debugfs(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    debug = paths.sys / "kernel" / "debug" / "rknpu"
    debug.mkdir(parents=True)
    (debug / "version").write_text("RKNPU driver: v0.9.8\n")
    result = d.check_npu_driver(board_settings(tmp_path), paths)
    assert result.status == "PASS" and "v0.9.8" in result.detail


def test_unreadable_driver_version_warns_where_it_looked(tmp_path: Path) -> None:
    paths = fake_tree(tmp_path)
    add_render_node(paths, "renderD129", "RKNPU")
    result = d.check_npu_driver(board_settings(tmp_path), paths)
    assert result.status == "WARN"
    assert "debug/rknpu/version" in result.detail
    assert result.hint is not None
    if os.geteuid() == 0:  # root already: the hint must not say "run as root"
        assert "run as root" not in result.hint and "mount -t debugfs" in result.hint
    else:
        assert "run as root" in result.hint


def test_no_driver_at_all_gives_no_root_hint(tmp_path: Path) -> None:
    result = d.check_npu_driver(board_settings(tmp_path), fake_tree(tmp_path))
    assert result.status == "WARN"
    assert result.hint is not None and "root" not in result.hint and "no rknpu driver is loaded" in result.hint


# -- library and model --------------------------------------------------------------------------


def test_library_for_another_architecture(tmp_path: Path) -> None:
    host = d.elf_machine(Path(sys.executable))
    foreign, name = (62, "x86_64") if host == "aarch64" else (183, "aarch64")
    library = tmp_path / "librkllmrt.so"
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack("<HHI", 3, foreign, 1)
    library.write_bytes(header + bytes(64))
    settings = Settings(runtime={"library": str(library), "model_path": str(tmp_path / "m.rkllm")})
    result = d.check_library(settings)
    assert result.status == "FAIL"
    assert f"built for {name}" in result.detail and f"this machine is {host}" in result.detail
    if name == "aarch64":
        assert result.hint is not None and 'runtime.library = "sim"' in result.hint


def test_library_that_is_not_elf(tmp_path: Path) -> None:
    library = tmp_path / "librkllmrt.so"
    library.write_text("not a library")
    result = d.check_library(Settings(runtime={"library": str(library), "model_path": "/m.rkllm"}))
    assert result.status == "FAIL" and "not an ELF shared library" in result.detail


def test_model_checks(tmp_path: Path) -> None:
    def model(path: str) -> d.CheckResult:
        return d.check_model(Settings(runtime={"library": "librkllmrt.so", "model_path": path}))

    missing = model(str(tmp_path / "absent.rkllm"))
    assert missing.status == "FAIL" and "does not exist" in missing.detail

    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 2048)
    wrong_suffix = model(str(other))
    assert wrong_suffix.status in ("WARN",)
    assert "2.0 KiB" in wrong_suffix.detail

    sim_spec = d.check_model(Settings(runtime={"library": "sim", "model_path": "sim:tokens=4"}))
    assert sim_spec.status == "PASS" and "simulated" in sim_spec.detail

    spec_without_sim = model("sim:tokens=4")
    assert spec_without_sim.status == "FAIL"


# -- broker ---------------------------------------------------------------------------------------


def test_embedded_broker_port_taken_by_another_broker(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    other = Mosquitto(tmp_path)
    other.start()
    try:
        result = d.check_broker(Settings(mqtt={"port": other.port}))
    finally:
        other.stop()
    assert result.status == "WARN"
    assert "an MQTT broker (mosquitto version" in result.detail and "already runs" in result.detail
    assert result.hint is not None and 'mqtt.host = "127.0.0.1"' in result.hint


def test_embedded_broker_of_another_serve_is_named(broker: EmbeddedBroker) -> None:
    result = d.check_broker(Settings(mqtt={"port": broker.port, "node_id": "elsewhere"}))
    assert result.status == "WARN"
    assert "the embedded broker of another rkllm-mqtt serve" in result.detail
    assert result.hint is not None and "mqtt.host" not in result.hint


def test_the_running_daemons_own_embedded_broker_is_recognised(tmp_path: Path) -> None:
    port = free_port()
    node = f"own-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_MQTT_")}
    env.update(RKLLM_MQTT_MQTT__PORT=str(port), RKLLM_MQTT_MQTT__NODE_ID=node, RKLLM_MQTT_LOGGING__FORMAT="json")
    serve = subprocess.Popen(
        [sys.executable, "-m", "rkllm_mqtt", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        probe = Probe(_wait_listening(port)).start()
        probe.subscribe(f"rkllm/{node}/availability")
        probe.wait_for(lambda msgs: any(m.payload == b"online" for m in msgs))
        probe.stop()
        settings = Settings(mqtt={"port": port, "node_id": node})
        result = d.check_broker(settings)
        home = d.check_homeassistant(settings)
    finally:
        serve.terminate()
        serve.wait(30)
    assert result.status == "PASS", result.render()
    assert f"the embedded broker of the rkllm-mqtt serve already running for node {node}" in result.detail
    assert home.status == "SKIP" and "127.0.0.1" in home.detail


def _wait_listening(port: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as attempt:
            if attempt.connect_ex(("127.0.0.1", port)) == 0:
                return port
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_embedded_broker_port_free() -> None:
    port = free_port()
    result = d.check_broker(Settings(mqtt={"port": port}))
    assert result.status == "PASS" and f"127.0.0.1:{port}" in result.detail


def test_tls_to_a_plain_port_is_a_tls_error(broker: EmbeddedBroker) -> None:
    settings = Settings(mqtt={"host": "127.0.0.1", "port": broker.port, "tls": True, "protocol": "3.1.1"})
    result = d.check_broker(settings, timeout=2.0)
    assert result.status == "FAIL"
    assert "TLS error" in result.detail


def test_home_assistant_birth_seen(broker: EmbeddedBroker) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:10]}"
    publisher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        publisher.publish(f"{prefix}/status", "online", qos=1, retain=True).wait_for_publish(5)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    settings = Settings(
        mqtt={"host": "127.0.0.1", "port": broker.port},
        homeassistant={"discovery_prefix": prefix, "status_topic": f"{prefix}/status"},
    )
    result = d.check_homeassistant(settings)
    assert result.status == "PASS", result.render()
    assert f"{prefix}/status" in result.detail


def test_home_assistant_absent_is_only_a_warning(broker: EmbeddedBroker) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        mqtt={"host": "127.0.0.1", "port": broker.port},
        homeassistant={"discovery_prefix": prefix, "status_topic": f"{prefix}/status"},
    )
    result = d.check_homeassistant(settings, listen=0.5)
    assert result.status == "WARN"
    disabled = d.check_homeassistant(Settings(homeassistant={"enabled": False}))
    assert disabled.status == "SKIP" and "disabled" in disabled.detail


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@pytest.fixture
def mosquitto_with_login(tmp_path: Path) -> Iterator[int]:
    if MOSQUITTO is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "bridge", "right"], check=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\npersistence false\n"
        # Started as root, mosquitto would switch to its own user, which cannot read the test's files.
        f"user {getpass.getuser()}\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("mosquitto did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_login_refused_is_reported_as_such(mosquitto_with_login: int) -> None:
    port = mosquitto_with_login
    wrong = Settings(mqtt={"host": "127.0.0.1", "port": port, "username": "bridge", "password": "wrong"})
    result = d.check_broker(wrong)
    assert result.status == "FAIL"
    assert "login refused as 'bridge'" in result.detail
    anonymous = d.check_broker(Settings(mqtt={"host": "127.0.0.1", "port": port}))
    assert anonymous.status == "FAIL" and "login refused without credentials" in anonymous.detail


def test_login_accepted_with_mqtt5(mosquitto_with_login: int, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("right\n")
    settings = Settings(
        mqtt={"host": "127.0.0.1", "port": mosquitto_with_login, "username": "bridge", "password_file": secret}
    )
    result = d.check_broker(settings)
    assert result.status == "PASS", result.render()
    assert "MQTT 5" in result.detail


def test_render_format() -> None:
    assert d.CheckResult("broker", "PASS", "ok").render() == "PASS  broker: ok"
    failed = d.CheckResult("model", "FAIL", "gone", "fix it").render()
    assert failed == "FAIL  model: gone\n      hint: fix it"
    assert d.CheckResult("x", "SKIP", "n/a", "ignored").render() == "SKIP  x: n/a"
