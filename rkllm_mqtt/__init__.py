"""rkllm-mqtt: an MQTT bridge for Rockchip's RKLLM runtime.

Importing the package does nothing but define it; ``__version__`` is read from the installed package's
metadata (``pyproject.toml`` is its one source) the first time it is asked for.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

__all__ = ["__version__"]

DISTRIBUTION = "rkllm-mqtt"


@lru_cache(maxsize=1)
def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
