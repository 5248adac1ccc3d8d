"""Giving memory back after a burst: a flood of messages leaves the heap grown long after the messages are gone.

CPython frees the objects, but glibc keeps the freed heap pages for later and the resident size stays where the
flood left it. ``malloc_trim(0)`` hands the free pages back to the kernel. Called once a deep inbox has drained,
not per message: it walks the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import structlog

log = structlog.get_logger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> None:
    """Collect garbage and return the free heap pages to the kernel where the C library allows it."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
    log.info("memory_released", trimmed=trim is not None)
