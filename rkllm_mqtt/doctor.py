"""``rkllm-mqtt doctor``: checks the board, the runtime, the model and the broker, one line each.

Every check is a small function returning a :class:`CheckResult`, so each can be tested alone. A line
reads ``PASS|FAIL|WARN|SKIP  <name>: <what was found>``, followed by an indented ``hint:`` on FAIL
and WARN. The exit code is 8 (``exit_codes.CHECK_FAILED``) when any check FAILs.

Status meaning: FAIL stops the bridge from working as configured; WARN works but deserves a look;
SKIP does not apply to this configuration (for example the NPU checks with the simulated runtime).

The runtime modules are imported inside the checks, so a broken import costs one check, not the report.
"""

from __future__ import annotations

import ctypes
import fcntl
import grp
import os
import platform
import pwd
import re
import socket
import stat
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cffi import FFI
from paho.mqtt.enums import MQTTErrorCode

from rkllm_mqtt import __version__, exit_codes
from rkllm_mqtt.broker import EMBEDDED_IDENTITY, SYS_VERSION_TOPIC, port_is_free
from rkllm_mqtt.errors import ConfigError
from rkllm_mqtt.mqtt_client import ConnectError, Connection, connect, where
from rkllm_mqtt.settings import ENV_PREFIX, SIM_LIBRARY, Settings
from rkllm_mqtt.topics import Topics

__all__ = [
    "MIN_DRIVER_VERSION",
    "RECOMMENDED_DRIVER_VERSION",
    "CheckResult",
    "NpuNode",
    "SystemPaths",
    "check_abi",
    "check_broker",
    "check_config",
    "check_homeassistant",
    "check_library",
    "check_model",
    "check_npu_device",
    "check_npu_driver",
    "doctor",
    "find_npu_nodes",
    "judge_driver_version",
    "parse_driver_version",
    "run_checks",
]

Status = Literal["PASS", "FAIL", "WARN", "SKIP"]

MIN_DRIVER_VERSION: Final = (0, 9, 7)
RECOMMENDED_DRIVER_VERSION: Final = (0, 9, 8)

# What the systemd unit grants (systemd/rkllm-mqtt.service): the user, its supplementary groups and
# the device nodes DevicePolicy=closed lets through.
SERVICE_USER: Final = "rkllm-mqtt"
SERVICE_GROUPS: Final = ("render", "video")
UNIT_DEVICE_ALLOW: Final = ("/dev/dri/renderD128", "/dev/dri/renderD129", "/dev/rknpu")

BROKER_TIMEOUT_S: Final = 5.0
EMBEDDED_HOST: Final = "127.0.0.1"
BIRTH_LISTEN_S: Final = 1.5


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``hint`` says what to do about a FAIL or WARN."""

    name: str
    status: Status
    detail: str
    hint: str | None = None

    def render(self) -> str:
        line = f"{self.status:<4}  {self.name}: {self.detail}"
        if self.hint and self.status in ("FAIL", "WARN"):
            line += f"\n      hint: {self.hint}"
        return line


@dataclass(frozen=True)
class SystemPaths:
    """Where the kernel's interfaces are mounted; tests point these at a fake tree."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")


@dataclass(frozen=True)
class NpuNode:
    """A device node of the Rockchip NPU and how it was recognised."""

    path: Path
    kind: Literal["drm", "misc"]
    driver: str


# -- helpers -------------------------------------------------------------------------------------


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _service_account() -> tuple[int, set[int]] | None:
    """uid and every gid the service runs with (own groups plus the unit's SupplementaryGroups)."""
    try:
        pw = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    gids = {pw.pw_gid}
    gids.update(os.getgrouplist(SERVICE_USER, pw.pw_gid))
    for name in SERVICE_GROUPS:
        gid = _gid_of(name)
        if gid is not None:
            gids.add(gid)
    return pw.pw_uid, gids


def _mode_allows(st: os.stat_result, uid: int, gids: set[int], want: int) -> bool:
    """Whether the mode bits give ``want`` (4 read, 2 write, 1 search) to uid/gids. ACLs are not read."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def _service_can(path: Path, want: int) -> bool | None:
    """Whether the service user could open ``path`` (``want``: 4 read, 6 read-write). None: no such user."""
    account = _service_account()
    if account is None:
        return None
    uid, gids = account
    try:
        for parent in reversed(path.parents):
            if not _mode_allows(parent.stat(), uid, gids, 1):
                return False
        return _mode_allows(path.stat(), uid, gids, want)
    except OSError:
        return False


_ELF_MACHINES: Final = {3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 40: "arm", 62: "x86_64", 183: "aarch64"}


def elf_machine(path: Path) -> str | None:
    """The CPU architecture an ELF file is built for (``aarch64``, ``x86_64`` …), None if not ELF."""
    try:
        with path.open("rb") as handle:
            header = handle.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack(f"{order}H", header[18:20])
    if machine == 243:
        return "riscv64" if header[4] == 2 else "riscv32"
    return _ELF_MACHINES.get(machine, f"machine {machine}")


def _host_machine() -> str:
    # The interpreter's own ELF header says what this process can load (a 32-bit userland on a 64-bit
    # kernel included), which platform.machine() does not.
    return elf_machine(Path(sys.executable)) or platform.machine()


# -- config --------------------------------------------------------------------------------------


def check_config(settings: Settings) -> CheckResult:
    source = settings.source_file
    env_keys = sorted(key for key in os.environ if key.startswith(ENV_PREFIX))
    origin = f"loaded from {source}" if source is not None else "no config file: defaults"
    if env_keys:
        origin += f", overridden by {', '.join(env_keys)}"
    try:
        settings.mqtt.resolved_password()
    except ConfigError as exc:
        return CheckResult("config", "FAIL", f"{origin}; {exc}", "make the password file readable")
    mqtt = settings.mqtt
    for key, path in (
        ("mqtt.tls_ca_file", mqtt.tls_ca_file),
        ("mqtt.tls_cert_file", mqtt.tls_cert_file),
        ("mqtt.tls_key_file", mqtt.tls_key_file),
    ):
        if path is not None and not path.is_file():
            return CheckResult("config", "FAIL", f"{origin}; {key} {path} does not exist", f"fix {key}")
    if (mqtt.tls_cert_file is None) != (mqtt.tls_key_file is None):
        return CheckResult(
            "config",
            "FAIL",
            f"{origin}; mqtt.tls_cert_file and mqtt.tls_key_file must be set together",
            "set both for mutual TLS, or neither",
        )
    if source is not None and _service_can(source, 4) is False:
        return CheckResult(
            "config",
            "WARN",
            f"{origin}; validated, but the service user {SERVICE_USER} cannot read {source}",
            f"chgrp {SERVICE_USER} {source} && chmod 0640 {source}",
        )
    return CheckResult("config", "PASS", f"{origin}; validated")


# -- runtime library and ABI -------------------------------------------------------------------


def _sim_abi(settings: Settings) -> str:
    from rkllm_mqtt.runtime.abi import sim_layout

    return sim_layout(settings.runtime.abi)


def _library_path(settings: Settings) -> Path:
    """The runtime library file; raises RuntimeLoadError (or ImportError) when there is none."""
    # Imported here, as in every check below: a broken runtime package fails those checks, not the report.
    from rkllm_mqtt.runtime.abi import resolve_library, sim_library_path

    library = settings.runtime.resolved_library()
    if library == SIM_LIBRARY:
        return sim_library_path(_sim_abi(settings))
    return resolve_library(library)


def _library_missing_hint(library: str) -> str:
    if library == SIM_LIBRARY:
        return "reinstall rkllm-mqtt with a C compiler present (pip install builds the simulated runtime)"
    return (
        "install librkllmrt.so from airockchip/rknn-llm (rkllm-runtime/Linux/librkllm_api/aarch64/) to "
        "/usr/lib and run ldconfig, or set runtime.library to its absolute path"
    )


def check_library(settings: Settings) -> CheckResult:
    name = "runtime library"
    library = settings.runtime.resolved_library()
    try:
        path = _library_path(settings)
    except ImportError as exc:
        return CheckResult(name, "FAIL", f"cannot import the runtime support: {exc}", "reinstall rkllm-mqtt")
    except Exception as exc:  # RuntimeLoadError and its kin: the message names the library
        return CheckResult(name, "FAIL", f"{library}: {exc}", _library_missing_hint(library))

    what = "sim: the bundled simulated runtime" if library == SIM_LIBRARY else library
    machine, host = elf_machine(path), _host_machine()
    if machine is None:
        return CheckResult(
            name, "FAIL", f"{what} -> {path} is not an ELF shared library", _library_missing_hint(library)
        )
    if machine != host:
        hint = (
            f"librkllmrt.so runs only on the Rockchip board itself; on this {host} machine use "
            'runtime.library = "sim" (the simulated runtime)'
            if machine == "aarch64"
            else f"install the {host} build of the library"
        )
        return CheckResult(name, "FAIL", f"{what} -> {path} is built for {machine}, this machine is {host}", hint)
    try:
        FFI().dlopen(str(path))
    except OSError as exc:
        message = str(exc)
        missing = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", message)
        if missing and missing.group(1) != path.name:
            hint = f"install the package that provides {missing.group(1)} (libgomp.so.1: apt install libgomp1)"
        else:
            hint = "check that the file is a complete, readable copy of the library"
        return CheckResult(name, "FAIL", f"{what} -> {path} found but dlopen fails: {message}", hint)
    try:
        from rkllm_mqtt.runtime.abi import read_runtime_version

        version = read_runtime_version(path)
    except OSError:
        version = None
    found = f"rkllm-runtime {version}" if version else "no version string"
    return CheckResult(name, "PASS", f"{what} -> {path} ({found}, {machine}); loads with dlopen")


def check_abi(settings: Settings) -> CheckResult:
    name = "runtime ABI"
    configured = settings.runtime.abi
    try:
        path = _library_path(settings)
    except Exception as exc:
        return CheckResult(name, "SKIP", f"no runtime library to inspect ({exc})")
    try:
        from rkllm_mqtt.runtime.abi import decide_abi

        decision = decide_abi(path, configured)
    except Exception as exc:  # AbiError: the message says what to set
        from rkllm_mqtt.runtime.abi import abi_choice_hint

        # A refusal for want of a version carries the hint for the log; here it gets its own line, once.
        hint = abi_choice_hint(path)
        return CheckResult(name, "FAIL", str(exc).replace(hint, "").strip(), hint)
    try:
        from rkllm_mqtt.runtime.binding import RkllmBinding

        RkllmBinding(str(path), decision.abi).open()
    except Exception as exc:
        return CheckResult(name, "FAIL", f"layout {decision.abi} ({decision.reason}), but binding fails: {exc}", None)
    return CheckResult(name, "PASS", f"layout {decision.abi}: {decision.reason}")


# -- model ---------------------------------------------------------------------------------------

# ProtectHome= hides these, PrivateTmp= gives the service its own /tmp.
_HIDDEN_FROM_SERVICE: Final = (
    Path("/home"),
    Path("/root"),
    Path("/run/user"),
    Path("/tmp"),
    Path("/var/tmp"),
)


def check_model(settings: Settings) -> CheckResult:
    name = "model"
    runtime = settings.runtime
    simulated = runtime.is_simulated
    model = runtime.model_path
    if model is None:
        if simulated:
            return CheckResult(name, "PASS", "no model_path: the simulated runtime simulates a model")
        return CheckResult(
            name, "FAIL", "runtime.model_path is not set", "set runtime.model_path to your .rkllm model file"
        )
    if model.startswith("sim:"):
        if simulated:
            return CheckResult(name, "PASS", f"{model}: a simulated model (spec for the simulated runtime)")
        return CheckResult(
            name,
            "FAIL",
            f"{model} is a simulated model spec, but runtime.library is {runtime.resolved_library()}",
            "set runtime.model_path to a .rkllm file",
        )
    path = Path(model).expanduser()
    if not path.is_absolute():
        return CheckResult(name, "FAIL", f"{model} is a relative path", "give the absolute path of the model file")
    if not path.exists():
        return CheckResult(name, "FAIL", f"{path} does not exist", "fix runtime.model_path")
    if not path.is_file():
        return CheckResult(name, "FAIL", f"{path} is not a file", "runtime.model_path must name the .rkllm file")
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
        size = path.stat().st_size
    except OSError as exc:
        return CheckResult(
            name,
            "FAIL",
            f"{path} cannot be read by this user: {exc.strerror or exc}",
            f"chmod a+r {path} (the service user {SERVICE_USER} must read it)",
        )
    what = f"{path} ({_human_size(size)})"
    if head.startswith(b"sim:"):
        what += ", a simulated model file"
    if simulated and not head.startswith(b"sim:"):
        what += "; the simulated runtime does not read real models"
    for hidden in _HIDDEN_FROM_SERVICE:
        if path.is_relative_to(hidden):
            return CheckResult(
                name,
                "WARN",
                f"{what}; under {hidden}, which the systemd unit hides from the service",
                f"move it to /var/lib/rkllm-mqtt/models, or add BindReadOnlyPaths={path} in a drop-in",
            )
    if _service_can(path, 4) is False:
        return CheckResult(
            name,
            "WARN",
            f"{what}; the service user {SERVICE_USER} cannot read it",
            f"chmod a+r {path} and make its directories searchable",
        )
    if path.suffix != ".rkllm" and not head.startswith(b"sim:"):
        return CheckResult(
            name,
            "WARN",
            f"{what}; the name does not end in .rkllm",
            "RKLLM models are .rkllm files converted with rkllm-toolkit for this runtime version and SoC",
        )
    return CheckResult(name, "PASS", f"{what}, readable")


# -- NPU device ----------------------------------------------------------------------------------


def _driver_name(device_dir: Path) -> str | None:
    link = device_dir / "driver"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        return None


def find_npu_nodes(paths: SystemPaths = SystemPaths()) -> list[NpuNode]:
    """Device nodes of the vendor rknpu driver: DRM render nodes bound to it, and ``/dev/rknpu``."""
    nodes: list[NpuNode] = []
    drm = paths.sys / "class" / "drm"
    for entry in sorted(drm.glob("renderD*")):
        driver = _driver_name(entry / "device")
        if driver is not None and driver.lower() == "rknpu":
            nodes.append(NpuNode(paths.dev / "dri" / entry.name, "drm", driver))
    misc = paths.dev / "rknpu"
    if misc.exists() or (paths.sys / "class" / "misc" / "rknpu").exists():
        nodes.append(NpuNode(misc, "misc", "rknpu"))
    return nodes


def _mainline_npu(paths: SystemPaths) -> str | None:
    """The mainline ``rocket`` accel driver's node, which the vendor runtime cannot use."""
    for entry in sorted((paths.sys / "class" / "accel").glob("accel*")):
        if (_driver_name(entry / "device") or "").lower() == "rocket":
            return str(paths.dev / "accel" / entry.name)
    return None


def _soc(paths: SystemPaths) -> str | None:
    for compatible in (
        paths.proc / "device-tree" / "compatible",
        paths.sys / "firmware" / "devicetree" / "base" / "compatible",
    ):
        try:
            values = compatible.read_bytes().split(b"\0")
        except OSError:
            continue
        for value in values:
            text = value.decode("ascii", "replace")
            if text.startswith("rockchip,rk"):
                return text.split(",", 1)[1]
        return None
    return None


def _no_npu_result(settings: Settings, paths: SystemPaths) -> CheckResult:
    name = "NPU device"
    soc = _soc(paths)
    rocket = _mainline_npu(paths)
    looked = "no /dev/dri/renderD* bound to the rknpu driver, no /dev/rknpu"
    if soc is None:
        detail = f"no NPU device found: this machine ({platform.machine()}) has no Rockchip NPU ({looked})"
        hint = 'run rkllm-mqtt on an RK3588 or RK3576 board, or use runtime.library = "sim" (simulated)'
    elif rocket is not None:
        detail = f"no rknpu device on this {soc}: the mainline rocket driver owns the NPU ({rocket})"
        hint = "RKLLM needs Rockchip's vendor rknpu driver (a vendor/BSP kernel), not the mainline one"
    else:
        detail = f"no NPU device found on this {soc} board ({looked})"
        hint = "boot a vendor kernel with the rknpu driver (RKNPU enabled in the device tree)"
    if settings.runtime.is_simulated:
        return CheckResult(name, "SKIP", f"{detail}; not needed with the simulated runtime")
    return CheckResult(name, "FAIL", detail, hint)


def _open_rw(path: Path) -> OSError | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        return exc
    os.close(fd)
    return None


def check_npu_device(settings: Settings, paths: SystemPaths = SystemPaths()) -> CheckResult:
    name = "NPU device"
    nodes = find_npu_nodes(paths)
    if not nodes:
        return _no_npu_result(settings, paths)
    node = nodes[0]
    try:
        st = node.path.stat()
    except OSError as exc:
        return CheckResult(
            name,
            "FAIL",
            f"{node.path} (driver {node.driver}) is registered but the node is missing: {exc.strerror}",
            "check that udev is running and created the device node",
        )
    group = _group_name(st.st_gid)
    described = f"{node.path} (driver {node.driver}, {stat.filemode(st.st_mode)} {_owner(st)}:{group})"
    if settings.runtime.is_simulated:
        described += "; unused: runtime.library is the simulated runtime"

    problems: list[str] = []
    hints: list[str] = []
    service = _service_can(node.path, 6)
    if service is False:
        problems.append(f"the service user {SERVICE_USER} cannot open it")
        hints.append(
            f"give the node to group render or video (config/udev/99-rknpu.rules), or add {SERVICE_USER} "
            f"to group {group}"
        )
    error = _open_rw(node.path)
    in_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if error is not None:
        who = "this user" + ("" if in_group else f" (not in group {group})")
        service_note = f" (the service user {SERVICE_USER} can)" if service else ""
        problems.append(f"{who} cannot open it read-write: {error.strerror}{service_note}")
        if not in_group:
            hints.append(f"to run rkllm-mqtt by hand: sudo usermod -aG {group} $USER, then log in again")
    if str(node.path) not in UNIT_DEVICE_ALLOW and node.path.parent == Path("/dev/dri"):
        problems.append("the systemd unit's DeviceAllow= does not list this node")
        hints.append(f"add DeviceAllow={node.path} rw in a drop-in (systemctl edit rkllm-mqtt)")

    if problems:
        blocking = service is False or (service is None and error is not None)
        # With the simulated runtime the NPU is not used: its problems are worth knowing, not failing on.
        status: Status = "FAIL" if blocking and not settings.runtime.is_simulated else "WARN"
        return CheckResult(name, status, f"{described}; {'; '.join(problems)}", "; ".join(hints) or None)
    others = f" (also {', '.join(str(n.path) for n in nodes[1:])})" if len(nodes) > 1 else ""
    return CheckResult(name, "PASS", f"{described}{others}; opens read-write")


def _owner(st: os.stat_result) -> str:
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return str(st.st_uid)


# -- NPU driver version --------------------------------------------------------------------------

_VERSION_RE: Final = re.compile(r"(?:RKNPU\s+driver:\s*)?v?(\d+)\.(\d+)\.(\d+)", re.IGNORECASE)


def parse_driver_version(text: str) -> tuple[int, int, int] | None:
    """``RKNPU driver: v0.9.8`` (debugfs), ``0.9.8`` (sysfs) → ``(0, 9, 8)``; None when there is none."""
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def judge_driver_version(version: tuple[int, int, int], source: str) -> CheckResult:
    name = "NPU driver"
    found = f"rknpu driver v{_dotted(version)} (from {source})"
    if version < MIN_DRIVER_VERSION:
        return CheckResult(
            name,
            "FAIL",
            f"{found} is too old: RKLLM needs v{_dotted(MIN_DRIVER_VERSION)} or newer",
            "with an older driver rkllm_init reports success but inference fails; update the kernel or the "
            f"rknpu driver to v{_dotted(RECOMMENDED_DRIVER_VERSION)} (airockchip/rknn-llm ships it)",
        )
    if version < RECOMMENDED_DRIVER_VERSION:
        return CheckResult(name, "PASS", f"{found}; v{_dotted(RECOMMENDED_DRIVER_VERSION)} is recommended")
    return CheckResult(name, "PASS", found)


class _DrmVersion(ctypes.Structure):
    # struct drm_version from <drm/drm.h>.
    _fields_ = (
        ("version_major", ctypes.c_int),
        ("version_minor", ctypes.c_int),
        ("version_patchlevel", ctypes.c_int),
        ("name_len", ctypes.c_size_t),
        ("name", ctypes.c_void_p),
        ("date_len", ctypes.c_size_t),
        ("date", ctypes.c_void_p),
        ("desc_len", ctypes.c_size_t),
        ("desc", ctypes.c_void_p),
    )


# _IOWR('d', 0x00, struct drm_version)
DRM_IOCTL_VERSION: Final = (3 << 30) | (ctypes.sizeof(_DrmVersion) << 16) | (ord("d") << 8) | 0x00


def drm_driver_version(node: Path) -> tuple[str, tuple[int, int, int]] | None:
    """The DRM driver name and version of a render node (the DRM_IOCTL_VERSION every DRM driver answers)."""
    name = ctypes.create_string_buffer(64)
    request = _DrmVersion()
    request.name_len = len(name)
    request.name = ctypes.addressof(name)
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, DRM_IOCTL_VERSION, request)
    except OSError:
        return None
    finally:
        os.close(fd)
    length = min(int(request.name_len), len(name))
    driver = name.raw[:length].decode("ascii", "replace")
    return driver, (request.version_major, request.version_minor, request.version_patchlevel)


def _version_sources(paths: SystemPaths, nodes: Iterable[NpuNode]) -> list[tuple[str, Callable[[], str | None]]]:
    def read(path: Path) -> Callable[[], str | None]:
        def reader() -> str | None:
            try:
                return path.read_text(encoding="ascii", errors="replace")
            except OSError:
                return None

        return reader

    def ioctl(node: Path) -> Callable[[], str | None]:
        def reader() -> str | None:
            found = drm_driver_version(node)
            if found is None or found[0].lower() != "rknpu":
                return None
            return _dotted(found[1])

        return reader

    sources: list[tuple[str, Callable[[], str | None]]] = [
        (str(paths.sys / "module" / "rknpu" / "version"), read(paths.sys / "module" / "rknpu" / "version"))
    ]
    for node in nodes:
        if node.kind == "drm":
            sources.append((f"DRM_IOCTL_VERSION on {node.path}", ioctl(node.path)))
    for path in (
        paths.sys / "kernel" / "debug" / "rknpu" / "version",
        paths.proc / "debug" / "rknpu" / "version",
    ):
        sources.append((str(path), read(path)))
    return sources


def check_npu_driver(settings: Settings, paths: SystemPaths = SystemPaths()) -> CheckResult:
    name = "NPU driver"
    nodes = find_npu_nodes(paths)
    sources = _version_sources(paths, nodes)
    for source, reader in sources:
        text = reader()
        if text is None:
            continue
        version = parse_driver_version(text)
        if version is not None:
            return judge_driver_version(version, source)
    if not nodes and settings.runtime.is_simulated:
        return CheckResult(name, "SKIP", "no rknpu driver on this machine; not needed with the simulated runtime")
    looked = ", ".join(source for source, _ in sources)
    need = f"RKLLM needs v{_dotted(MIN_DRIVER_VERSION)} or newer"
    if not nodes:
        # Nothing to read a version from: the driver is not loaded (the NPU device check says more).
        hint = f"no rknpu driver is loaded: see the NPU device check; {need}"
    elif os.geteuid() == 0:
        hint = f"debugfs is not mounted: mount -t debugfs none /sys/kernel/debug, then run doctor again; {need}"
    else:
        hint = f"run as root: sudo cat /sys/kernel/debug/rknpu/version (debugfs is readable by root only); {need}"
    return CheckResult(name, "WARN", f"driver version unreadable (looked in {looked})", hint)


# -- broker --------------------------------------------------------------------------------------


def _connect(settings: Settings, timeout: float) -> Connection:
    """A connection made exactly as serve makes it (rkllm_mqtt.mqtt_client); ConnectError says why not."""
    cfg = settings.mqtt
    return connect(
        cfg,
        host=cfg.host or EMBEDDED_HOST,
        port=cfg.port,
        embedded=settings.embedded_broker,
        client_id=f"rkllm-mqtt-doctor-{uuid.uuid4().hex[:8]}",
        timeout=timeout,
    )


def _retained(connection: Connection, topics: Sequence[str], timeout: float) -> dict[str, str]:
    """The retained payloads of ``topics``, read after a barrier: a second SUBSCRIBE's SUBACK comes after the
    retained messages of the first (brokers handle one client's packets in order)."""
    client = connection.client
    acked: list[int] = []
    client.on_subscribe = lambda _c, _u, mid, _codes, _props: acked.append(mid)
    client.subscribe([(topic, 0) for topic in topics])
    _result, barrier = client.subscribe(f"$rkllm-doctor/{uuid.uuid4().hex}", 0)
    end = time.monotonic() + timeout
    while barrier not in acked and not connection.lost and time.monotonic() < end:
        if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break
    return {
        topic: payload.decode("utf-8", "replace").strip()
        for topic, payload, retain in connection.messages
        if retain and topic in topics
    }


def _port_is_free(host: str, port: int) -> bool:
    try:
        return port_is_free(host, port)
    except OSError:
        return False


def _embedded_port_taken(settings: Settings, timeout: float) -> CheckResult:
    """mqtt.host is unset but the port is taken: by this node's own daemon, another broker, or not a broker."""
    name = "broker"
    cfg = settings.mqtt
    place = f"{EMBEDDED_HOST}:{cfg.port}"
    try:
        connection = _connect(settings, timeout)
    except ConnectError:
        return CheckResult(
            name,
            "FAIL",
            f"mqtt.host is unset, but {place} is taken by something that is not an MQTT broker",
            f"free port {cfg.port}, or set mqtt.port to another port",
        )
    topics = Topics(cfg.base_topic, cfg.node_id)
    try:
        seen = _retained(connection, [SYS_VERSION_TOPIC, topics.availability], timeout)
    finally:
        connection.close()
    identity = seen.get(SYS_VERSION_TOPIC, "")
    availability = seen.get(topics.availability)
    if identity.startswith(EMBEDDED_IDENTITY) and availability == "online":
        return CheckResult(
            name,
            "PASS",
            f"{place} is the embedded broker of the rkllm-mqtt serve already running for node {cfg.node_id} "
            f"({identity}; {topics.availability} is online)",
        )
    if identity.startswith(EMBEDDED_IDENTITY):
        return CheckResult(
            name,
            "WARN",
            f"mqtt.host is unset, but {place} is the embedded broker of another rkllm-mqtt serve ({identity}; "
            f"{topics.availability} is {availability or 'not retained'}): a second one cannot start there",
            "stop that serve, or give this one another mqtt.port",
        )
    what = f"an MQTT broker ({identity})" if identity else "an MQTT broker"
    return CheckResult(
        name,
        "WARN",
        f"mqtt.host is unset, but {what} already runs on {place}: the embedded one cannot start",
        f'set mqtt.host = "{EMBEDDED_HOST}" to use that broker, or stop it',
    )


def check_broker(settings: Settings, timeout: float = BROKER_TIMEOUT_S) -> CheckResult:
    name = "broker"
    cfg = settings.mqtt
    if cfg.host is None:
        if _port_is_free(EMBEDDED_HOST, cfg.port):
            return CheckResult(
                name,
                "PASS",
                f"mqtt.host is unset: serve will start the embedded broker on {EMBEDDED_HOST}:{cfg.port} "
                "(port is free)",
            )
        return _embedded_port_taken(settings, timeout)
    try:
        connection = _connect(settings, timeout)
    except ConnectError as problem:
        return CheckResult(name, "FAIL", problem.detail, problem.hint)
    connection.close()
    login = f" as {cfg.username!r}" if cfg.username else ""
    tls = ""
    if cfg.uses_tls:
        tls = " over TLS" + (" with a client certificate" if cfg.tls_cert_file else "")
    return CheckResult(
        name,
        "PASS",
        f"{where(cfg, cfg.host, cfg.port)}: connected{login}{tls} with MQTT {connection.protocol}",
    )


def check_homeassistant(
    settings: Settings, timeout: float = BROKER_TIMEOUT_S, listen: float = BIRTH_LISTEN_S
) -> CheckResult:
    name = "Home Assistant"
    ha = settings.homeassistant
    if settings.discovery_defaulted_off:
        return CheckResult(
            name,
            "SKIP",
            "discovery is off: the embedded broker listens on 127.0.0.1 only, where Home Assistant cannot reach it "
            "(set mqtt.host to Home Assistant's broker to use it)",
        )
    if not ha.enabled:
        return CheckResult(name, "SKIP", "discovery is disabled (homeassistant.enabled = false)")
    topic = ha.status_topic
    if settings.mqtt.host is None:
        return CheckResult(
            name,
            "WARN",
            f"discovery under {ha.discovery_prefix}/ goes to the embedded broker, which listens on 127.0.0.1 "
            "only: Home Assistant cannot see it",
            "set mqtt.host to the broker Home Assistant uses (for example its Mosquitto add-on)",
        )
    try:
        session = _connect(settings, timeout)
    except ConnectError:
        return CheckResult(name, "SKIP", f"discovery under {ha.discovery_prefix}/; broker not reachable")
    try:
        session.client.subscribe(topic, qos=0)
        end = time.monotonic() + listen
        while time.monotonic() < end and not session.lost:
            if session.client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if any(t == topic for t, _p, _r in session.messages):
                break
    finally:
        session.close()
    payloads = [payload.decode("utf-8", "replace").strip() for t, payload, _r in session.messages if t == topic]
    if "online" in payloads:
        return CheckResult(name, "PASS", f"discovery enabled; Home Assistant's 'online' seen on {topic}")
    if payloads:
        return CheckResult(
            name,
            "WARN",
            f"discovery enabled; {topic} says {payloads[-1]!r}: Home Assistant is not connected",
            "start Home Assistant's MQTT integration; the bridge re-announces itself when it says online",
        )
    return CheckResult(
        name,
        "WARN",
        f"discovery enabled; no retained 'online' on {topic} within {listen:.1f} s",
        "Home Assistant sends its birth message only when it connects (retained only if configured so); "
        f"check that it uses this broker and the discovery prefix {ha.discovery_prefix!r}",
    )


# -- the command ---------------------------------------------------------------------------------


def run_checks(settings: Settings) -> list[CheckResult]:
    """Every check in order, each printed as soon as it is known."""
    checks: list[Callable[[Settings], CheckResult]] = [
        check_config,
        check_library,
        check_abi,
        check_model,
        check_npu_device,
        check_npu_driver,
        check_broker,
        check_homeassistant,
    ]
    from rkllm_mqtt.api.preflight import check_api  # it builds on this module's CheckResult

    checks.append(check_api)
    results: list[CheckResult] = []
    for check in checks:
        try:
            result = check(settings)
        except Exception as exc:  # a bug in one check must not hide the others
            label = check.__name__.removeprefix("check_").replace("_", " ")
            result = CheckResult(label, "FAIL", f"check crashed: {exc.__class__.__name__}: {exc}", None)
        print(result.render(), flush=True)
        results.append(result)
    return results


def doctor(settings: Settings) -> int:
    """Print one line per check; exit_codes.CHECK_FAILED when any check failed, else 0."""
    print(f"rkllm-mqtt {__version__} doctor on {socket.gethostname()} ({_host_machine()})", flush=True)
    results = run_checks(settings)
    counts = {status: sum(1 for r in results if r.status == status) for status in ("PASS", "FAIL", "WARN", "SKIP")}
    summary = ", ".join(f"{count} {status}" for status, count in counts.items())
    print(f"summary: {summary}", flush=True)
    return exit_codes.CHECK_FAILED if counts["FAIL"] else exit_codes.OK
