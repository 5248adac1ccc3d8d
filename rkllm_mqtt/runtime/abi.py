"""Which ABI layout a runtime library has, and where the library is.

No RKLLM function reports its version, and 1.2.x and 1.3.0 export the same symbols, so the layout can only be
known from evidence in the file: the ``rkllm-runtime version: X.Y.Z`` string the runtime logs at init. A wrong
layout is a segfault on the user's board, so ``runtime.abi = "auto"`` decides only from that evidence and
otherwise refuses, asking for ``runtime.abi`` to be set.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rkllm_mqtt.errors import AbiError, RuntimeLoadError

__all__ = [
    "LIBRARY_SEARCH_DIRS",
    "RUNTIMES_OF_LAYOUT",
    "AbiDecision",
    "abi_choice_hint",
    "abi_for_version",
    "check_init_version",
    "decide_abi",
    "read_runtime_version",
    "resolve_library",
    "sim_layout",
    "sim_library_path",
    "version_in_log_line",
]

# The digits may carry a short suffix (1.2.1b1). The suffix is bounded so a match is always shorter than the
# overlap kept between chunks in read_runtime_version.
_VERSION_RE: Final = re.compile(rb"rkllm-runtime version: (\d{1,3}(?:\.\d{1,4}){1,3}(?:[A-Za-z][0-9A-Za-z]{0,7})?)")
_CHUNK: Final = 1 << 20
_OVERLAP: Final = 64

_SIM_TAGS: Final = {"1.2": "12", "1.3": "13"}

# The runtime.abi value for each runtime release, as messages name them (1.3.x: the 1.3 layout until a release
# changes it, as _classify assumes).
RUNTIMES_OF_LAYOUT: Final = {"1.2": "1.2.1, 1.2.2 or 1.2.3", "1.3": "1.3.x"}

# Where a bare library name is looked for after LD_LIBRARY_PATH: where the vendor's instructions and the
# distributions put librkllmrt.so on a board.
LIBRARY_SEARCH_DIRS: Final = (
    Path("/usr/local/lib"),
    Path("/usr/lib"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/lib"),
    Path("/lib/aarch64-linux-gnu"),
)


@dataclass(frozen=True)
class AbiDecision:
    """The layout to bind with, the version found in the library (if any) and why, for logs and health."""

    abi: str
    version: str | None
    reason: str


def read_runtime_version(path: Path) -> str | None:
    """The runtime version stored in the library file, or None when there is none or it is ambiguous.

    The file is read in 1 MiB chunks (runtime libraries are several MiB). Two different versions in one file
    are not evidence of either, so that also gives None.
    """
    found: set[str] = set()
    tail = b""
    with path.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            at_eof = not chunk
            buf = tail + chunk
            for match in _VERSION_RE.finditer(buf):
                # A match touching the end of the buffer may be cut short; the overlap finds it again whole.
                if match.end() == len(buf) and not at_eof:
                    continue
                found.add(match.group(1).decode("ascii"))
            if at_eof:
                break
            tail = buf[-_OVERLAP:]
    if len(found) == 1:
        return found.pop()
    return None


def _classify(version: str) -> str:
    """ "1.2", "1.3", or "old" / "new" / "unreadable" for versions without a known layout."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return "unreadable"
    major, minor, patch = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if (major, minor) == (1, 2) and patch >= 1:
        return "1.2"
    if (major, minor) == (1, 3):
        return "1.3"
    return "old" if (major, minor, patch) < (1, 2, 1) else "new"


def abi_for_version(version: str) -> str:
    """The ABI layout of runtime ``version``; AbiError for versions whose layout this bridge does not know."""
    kind = _classify(version)
    if kind in _SIM_TAGS:
        return kind
    if kind == "old":
        raise AbiError(
            f"rkllm runtime {version} is not supported: runtimes before 1.2.1 use another ABI layout; "
            "install runtime 1.2.1 or newer"
        )
    if kind == "new":
        raise AbiError(
            f"rkllm runtime {version} is newer than the ABI layouts this bridge knows (1.2.1 to 1.3.x); "
            'if its rkllm.h has the same layout as 1.3.0 (or 1.2.x), set runtime.abi = "1.3" (or "1.2") '
            "explicitly"
        )
    raise AbiError(f"cannot read rkllm runtime version {version!r}. " + abi_choice_hint())


def abi_choice_hint(library_path: Path | str = "librkllmrt.so") -> str:
    """Which ``runtime.abi`` to set by hand, and every way to learn the runtime's version, in one message.

    Said whenever the library's layout cannot be read from the file: a runtime that builds its
    ``rkllm-runtime version: …`` line from a format string leaves no version in the file for ``auto`` to read.
    """
    values = ", or ".join(f'"{abi}" for runtime {runtimes}' for abi, runtimes in RUNTIMES_OF_LAYOUT.items())
    return (
        f"Set runtime.abi (section [runtime] of the configuration) to {values}. The runtime's version is the "
        'airockchip/rknn-llm release the library was taken from (release-v1.2.3 needs "1.2"). Not sure? Set '
        "either value and start the service once: the runtime prints 'rkllm-runtime version: X.Y.Z' while the "
        "model loads (journalctl -u rkllm-mqtt | grep 'rkllm-runtime version'), and if the value is the wrong one "
        "the bridge stops the runtime there and its health names the value to set; a wrong guess costs at most "
        f"the worker process the runtime runs in, never the bridge. strings -a {library_path} | grep -i version "
        "may show the version too"
    )


def decide_abi(library_path: Path, configured: str) -> AbiDecision:
    """Choose the layout for ``library_path`` given ``runtime.abi`` (``"auto"``, ``"1.2"`` or ``"1.3"``).

    An explicit setting is honoured unless the library's own version string certainly contradicts it (a known
    version of the other layout, or one too old to support): binding with the wrong layout crashes. For a
    runtime newer than any known layout the setting is exactly how the user vouches for its layout.
    """
    if configured not in ("auto", *_SIM_TAGS):
        raise AbiError(f'runtime.abi = "{configured}" is not valid; use "auto", "1.2" or "1.3"')
    try:
        version = read_runtime_version(library_path)
    except OSError as exc:
        raise RuntimeLoadError(f"cannot read runtime library {library_path}: {exc.strerror or exc}") from exc

    if configured == "auto":
        if version is None:
            raise AbiError(
                f"cannot tell the ABI layout of {library_path}: it holds no single 'rkllm-runtime version: X.Y.Z' "
                "string (a runtime that prints its version through a format string holds none). "
                + abi_choice_hint(library_path)
            )
        return AbiDecision(abi_for_version(version), version, f"library says rkllm-runtime version {version}")

    setting = f'runtime.abi = "{configured}" set in the configuration'
    if version is None:
        return AbiDecision(configured, None, setting)
    kind = _classify(version)
    if kind == "old":
        raise AbiError(
            f'runtime.abi = "{configured}" is set, but {library_path} says rkllm-runtime version {version}, '
            "which uses an older, unsupported layout; install runtime 1.2.1 or newer"
        )
    if kind in _SIM_TAGS and kind != configured:
        raise AbiError(
            f'runtime.abi = "{configured}" is set, but {library_path} says rkllm-runtime version {version}, '
            f'which has the "{kind}" layout; binding with the wrong layout would crash. Set runtime.abi to '
            f'"{kind}" or "auto"'
        )
    return AbiDecision(configured, version, f"{setting}; library says rkllm-runtime version {version}")


def sim_library_path(abi: str) -> Path:
    """The built simulated runtime for layout ``abi``, shipped inside the package."""
    try:
        tag = _SIM_TAGS[abi]
    except KeyError:
        raise AbiError(f'no simulated runtime for ABI layout "{abi}"; use "1.2" or "1.3"') from None
    module = f"rkllm_mqtt.runtime.sim._librkllm_sim_{tag}"
    # find_spec locates the extension file without loading it, and also follows editable installs.
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin is not None and Path(spec.origin).is_file():
        return Path(spec.origin)
    sim_dir = Path(__file__).resolve().parent / "sim"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = sim_dir / f"_librkllm_sim_{tag}{suffix}"
        if candidate.is_file():
            return candidate
    raise RuntimeLoadError(
        f"the simulated runtime for ABI {abi} is not built ({module} not found in {sim_dir}); reinstall the "
        "package on a machine with a C compiler: pip install ."
    )


def resolve_library(library: str, search_dirs: Sequence[Path] | None = None) -> Path:
    """The file of runtime library ``library``: an absolute path, or a bare name searched for.

    A relative path with a slash is refused: resolving it against whatever the working directory happens to be
    loads a different library depending on how the daemon was started. ``"sim"`` is not a file; callers
    handle it with :func:`sim_library_path`.
    """
    if library == "sim":
        raise ValueError('"sim" names the simulated runtime; use sim_library_path(abi) for it')
    if not library:
        raise RuntimeLoadError('runtime.library is empty; give a library name, an absolute path or "sim"')
    if "/" in library:
        path = Path(library).expanduser()
        if not path.is_absolute():
            raise RuntimeLoadError(
                f"runtime.library {library!r} is a relative path; give an absolute path (relative paths "
                "are not resolved against the working directory) or a bare name such as librkllmrt.so to "
                "search the library directories"
            )
        if not path.is_file():
            raise RuntimeLoadError(f"runtime library {path} does not exist")
        return path
    dirs = list(search_dirs) if search_dirs is not None else _default_search_dirs()
    for directory in dirs:
        candidate = directory / library
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise RuntimeLoadError(f"runtime library {library} not found; searched {searched}")


def _default_search_dirs() -> list[Path]:
    # LD_LIBRARY_PATH first, as the dynamic loader does; empty or relative entries would mean the working
    # directory, which is exactly what we refuse to depend on.
    dirs = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and os.path.isabs(p)]
    for directory in LIBRARY_SEARCH_DIRS:
        if directory not in dirs:
            dirs.append(directory)
    return dirs


def sim_layout(configured: str) -> str:
    """The build of the simulated runtime for ``runtime.abi``: one build per layout, and "auto" takes 1.3."""
    return "1.3" if configured == "auto" else configured


_LOG_VERSION_RE: Final = re.compile(_VERSION_RE.pattern.decode("ascii"))


def version_in_log_line(line: str) -> str | None:
    """The version in a runtime log line such as ``I rkllm: rkllm-runtime version: 1.2.1, rknpu driver ...``."""
    match = _LOG_VERSION_RE.search(line)
    return match.group(1) if match else None


def check_init_version(said: str, abi: str, configured: str) -> str | None:
    """Why the layout ``abi`` cannot be used with a runtime that said ``rkllm-runtime version: said`` during
    rkllm_init, or None when they agree (or the version's layout is unknown: set by hand, that is the user's
    word). ``configured`` is ``runtime.abi``, so the message can say whose choice ``abi`` was."""
    kind = _classify(said)
    if kind not in _SIM_TAGS and kind != "old":
        return None
    if kind == abi:
        return None
    if configured == "auto":
        chosen = f'runtime.abi = "auto" chose the "{abi}" layout'
    else:
        chosen = f'runtime.abi = "{configured}" is set'
    if kind == "old":
        return (
            f"{chosen}, but the runtime said rkllm-runtime version {said} during rkllm_init, which uses an "
            "older, unsupported layout; install runtime 1.2.1 or newer"
        )
    return (
        f"{chosen}, but the runtime said rkllm-runtime version {said} during rkllm_init, which has the "
        f'"{kind}" layout; binding it with the "{abi}" layout crashes sooner or later. '
        f'Set runtime.abi = "{kind}" in the configuration'
    )
