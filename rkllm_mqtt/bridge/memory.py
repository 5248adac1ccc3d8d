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
import sys

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
    # CPython's method cache (4,096 entries) keeps a reference to the name of each attribute looked up. Names built
    # at run time (json's decoder asks its context for "object_hook" by a C string, paho strips the spaces from
    # its property names for every message) are new strings each time, so after a flood the cache holds thousands
    # of them, each alone on a page of the heap, and those pages cannot be given back. Emptying the cache frees
    # them; it fills again with the next lookups.
    clear_type_cache = getattr(sys, "_clear_type_cache", None)
    if clear_type_cache is not None:
        clear_type_cache()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
    log.info("memory_released", trimmed=trim is not None)
