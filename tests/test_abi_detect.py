"""ABI detection from the library file, and finding the library."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rkllm_mqtt.doctor import check_abi
from rkllm_mqtt.errors import AbiError, RuntimeLoadError
from rkllm_mqtt.runtime.abi import (
    RUNTIMES_OF_LAYOUT,
    AbiDecision,
    abi_choice_hint,
    abi_for_version,
    decide_abi,
    read_runtime_version,
    resolve_library,
    sim_library_path,
)
from rkllm_mqtt.settings import Settings


def fake_library(tmp_path: Path, *versions: str, padding: int = 4096, name: str = "librkllmrt.so") -> Path:
    """A binary-looking file holding the given version strings, like a runtime built with them."""
    body = bytearray(os.urandom(padding))
    for version in versions:
        body += b"\x00I rkllm: %s\x00" % f"rkllm-runtime version: {version}".encode()
        body += os.urandom(padding)
    path = tmp_path / name
    path.write_bytes(bytes(body))
    return path


@pytest.mark.parametrize(
    ("version", "abi"),
    [("1.2.1", "1.2"), ("1.2.2", "1.2"), ("1.2.3", "1.2"), ("1.3.0", "1.3"), ("1.3.1", "1.3")],
)
def test_known_versions_give_their_layout(tmp_path: Path, version: str, abi: str) -> None:
    lib = fake_library(tmp_path, version)
    assert read_runtime_version(lib) == version
    assert abi_for_version(version) == abi
    decision = decide_abi(lib, "auto")
    assert decision == AbiDecision(abi, version, f"library says rkllm-runtime version {version}")


@pytest.mark.parametrize("version", ["1.1.4", "1.2.0", "1.0.1"])
def test_versions_before_1_2_1_are_refused_by_name(tmp_path: Path, version: str) -> None:
    with pytest.raises(AbiError, match=rf"{version}.*not supported.*1\.2\.1 or newer"):
        decide_abi(fake_library(tmp_path, version), "auto")


@pytest.mark.parametrize("version", ["1.4.0", "2.0.1"])
def test_newer_unknown_versions_are_refused_asking_for_runtime_abi(tmp_path: Path, version: str) -> None:
    with pytest.raises(AbiError, match=rf"{version}.*set runtime\.abi"):
        decide_abi(fake_library(tmp_path, version), "auto")


def test_no_version_string_is_refused_naming_runtime_abi(tmp_path: Path) -> None:
    lib = fake_library(tmp_path)
    assert read_runtime_version(lib) is None
    with pytest.raises(AbiError, match=r'runtime\.abi .*to "1\.2".*"1\.3"') as info:
        decide_abi(lib, "auto")
    assert str(lib) in str(info.value)


def format_string_library(tmp_path: Path) -> Path:
    """What a real runtime most likely holds: its init line as a printf format, the version filled in at run time."""
    lib = tmp_path / "librkllmrt.so"
    text = b"rkllm-runtime version: %s, rknpu driver version: %s, platform: %s\n"
    lib.write_bytes(os.urandom(4096) + b"\x00I rkllm: " + text + b"\x00" + os.urandom(4096))
    return lib


def test_a_format_string_is_no_version_and_the_refusal_says_what_to_do(tmp_path: Path) -> None:
    lib = format_string_library(tmp_path)
    assert read_runtime_version(lib) is None
    with pytest.raises(AbiError) as info:
        decide_abi(lib, "auto")
    message = str(info.value)
    assert message.startswith(f"cannot tell the ABI layout of {lib}")
    # Exactly which value for which runtime...
    assert '"1.2" for runtime 1.2.1, 1.2.2 or 1.2.3' in message
    assert '"1.3" for runtime 1.3.x' in message
    # ...and every way to learn the version: the release, the runtime's own init line, the file itself.
    assert "airockchip/rknn-llm release" in message
    assert "journalctl -u rkllm-mqtt | grep 'rkllm-runtime version'" in message
    assert f"strings -a {lib} | grep -i version" in message
    assert message.endswith(abi_choice_hint(lib))


@pytest.mark.parametrize(("abi", "runtimes"), list(RUNTIMES_OF_LAYOUT.items()))
def test_the_hint_names_each_runtime_with_the_layout_auto_would_pick(abi: str, runtimes: str) -> None:
    versions = re.findall(r"\d+\.\d+\.[\dx]+", runtimes)
    assert versions, runtimes
    for version in versions:
        assert abi_for_version(version.replace("x", "0")) == abi
    assert f'"{abi}" for runtime {runtimes}' in abi_choice_hint()


def test_unreadable_version_points_to_the_same_hint() -> None:
    with pytest.raises(AbiError) as info:
        abi_for_version("banana")
    assert "'banana'" in str(info.value)
    assert abi_choice_hint() in str(info.value)


def test_doctor_gives_the_hint_its_own_line_once(tmp_path: Path) -> None:
    lib = format_string_library(tmp_path)
    result = check_abi(Settings(runtime={"library": str(lib), "model_path": str(tmp_path / "m.rkllm")}))
    assert result.status == "FAIL"
    assert result.hint == abi_choice_hint(lib)
    assert result.detail.startswith(f"cannot tell the ABI layout of {lib}")
    assert "journalctl" not in result.detail, "the hint is shown once, on its own line"
    rendered = result.render()
    assert rendered.count("journalctl") == 1
    assert '      hint: Set runtime.abi (section [runtime] of the configuration) to "1.2"' in rendered


def test_doctor_on_a_contradiction_keeps_the_reason_and_adds_the_hint() -> None:
    result = check_abi(Settings(runtime={"library": str(sim_library_path("1.3")), "abi": "1.2", "model_path": "/m"}))
    assert result.status == "FAIL"
    assert 'runtime.abi = "1.2" is set' in result.detail
    assert "1.3.0" in result.detail
    assert result.hint is not None and '"1.3" for runtime 1.3.x' in result.hint


def test_two_different_versions_are_no_evidence(tmp_path: Path) -> None:
    lib = fake_library(tmp_path, "1.2.3", "1.3.0")
    assert read_runtime_version(lib) is None
    with pytest.raises(AbiError, match=r"runtime\.abi"):
        decide_abi(lib, "auto")


def test_repeated_version_and_suffix(tmp_path: Path) -> None:
    lib = fake_library(tmp_path, "1.2.1b1", "1.2.1b1")
    assert read_runtime_version(lib) == "1.2.1b1"
    assert decide_abi(lib, "auto").abi == "1.2"


@pytest.mark.parametrize("offset_from_boundary", [-30, -12, -1, 0, 5])
def test_version_across_a_chunk_boundary_is_found_whole(tmp_path: Path, offset_from_boundary: int) -> None:
    marker = b"rkllm-runtime version: 1.3.0"
    start = (1 << 20) + offset_from_boundary  # the reader's chunk is 1 MiB
    data = bytearray(b"\x00" * ((1 << 20) + 4096))
    data[start : start + len(marker)] = marker
    lib = tmp_path / "lib.so"
    lib.write_bytes(bytes(data))
    assert read_runtime_version(lib) == "1.3.0"


@pytest.mark.parametrize(("abi", "version"), [("1.2", "1.2.3"), ("1.3", "1.3.0")])
def test_built_sim_libraries_are_detected(abi: str, version: str) -> None:
    path = sim_library_path(abi)
    assert path.is_file()
    assert read_runtime_version(path) == version
    assert decide_abi(path, "auto") == AbiDecision(abi, version, f"library says rkllm-runtime version {version}")


def test_explicit_setting_matching_the_library(tmp_path: Path) -> None:
    decision = decide_abi(fake_library(tmp_path, "1.3.0"), "1.3")
    assert decision.abi == "1.3"
    assert decision.version == "1.3.0"
    assert 'runtime.abi = "1.3"' in decision.reason
    assert "1.3.0" in decision.reason


def test_explicit_setting_without_evidence_is_honoured(tmp_path: Path) -> None:
    decision = decide_abi(fake_library(tmp_path), "1.2")
    assert decision == AbiDecision("1.2", None, 'runtime.abi = "1.2" set in the configuration')


def test_explicit_setting_for_a_newer_runtime_is_honoured(tmp_path: Path) -> None:
    decision = decide_abi(fake_library(tmp_path, "1.4.0"), "1.3")
    assert (decision.abi, decision.version) == ("1.3", "1.4.0")


def test_certain_contradiction_is_refused_naming_both() -> None:
    lib = sim_library_path("1.3")
    with pytest.raises(AbiError) as info:
        decide_abi(lib, "1.2")
    message = str(info.value)
    assert 'runtime.abi = "1.2"' in message
    assert "1.3.0" in message
    assert '"1.3" layout' in message


def test_explicit_setting_on_a_too_old_runtime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AbiError, match=r"1\.1\.4.*1\.2\.1 or newer"):
        decide_abi(fake_library(tmp_path, "1.1.4"), "1.2")


def test_invalid_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AbiError, match=r'runtime\.abi = "1\.1" is not valid'):
        decide_abi(fake_library(tmp_path, "1.2.3"), "1.1")


def test_unreadable_library_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"missing\.so"):
        decide_abi(tmp_path / "missing.so", "auto")


def test_sim_library_path_rejects_unknown_layout() -> None:
    with pytest.raises(AbiError, match=r"1\.4"):
        sim_library_path("1.4")


# -- resolve_library --


def test_absolute_path_is_used_as_is(tmp_path: Path) -> None:
    lib = fake_library(tmp_path, "1.2.3")
    assert resolve_library(str(lib)) == lib


def test_missing_absolute_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "librkllmrt.so"
    with pytest.raises(RuntimeLoadError, match=re.escape(str(missing))):
        resolve_library(str(missing))


def test_relative_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_library(tmp_path, "1.2.3")
    monkeypatch.chdir(tmp_path.parent)
    # The file exists relative to the working directory, and is still refused.
    with pytest.raises(RuntimeLoadError, match="relative path"):
        resolve_library(f"{tmp_path.name}/librkllmrt.so")
    with pytest.raises(RuntimeLoadError, match="relative path"):
        resolve_library("./librkllmrt.so")


def test_bare_name_is_found_through_ld_library_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = fake_library(tmp_path, "1.2.3", name="librkllmrt_test_only.so")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"relative/dir::{tmp_path}")
    assert resolve_library("librkllmrt_test_only.so") == lib


def test_bare_name_not_found_names_library_and_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    with pytest.raises(RuntimeLoadError) as info:
        resolve_library("librkllmrt_never_there.so")
    message = str(info.value)
    assert "librkllmrt_never_there.so" in message
    for place in (str(tmp_path), "/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu", "/lib"):
        assert place in message


def test_bare_name_in_given_search_dirs(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    lib = fake_library(second, "1.3.0")
    assert resolve_library("librkllmrt.so", search_dirs=[first, second]) == lib


def test_sim_is_not_a_library_name() -> None:
    with pytest.raises(ValueError, match="sim_library_path"):
        resolve_library("sim")
