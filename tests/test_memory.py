"""Giving memory back after a flood: what the release frees, on the real interpreter."""

from __future__ import annotations

import sys

from rkllm_mqtt.bridge.memory import release_free_memory


def test_release_drops_the_attribute_names_the_method_cache_holds() -> None:
    class Probe:
        pass

    # A name built at run time, as paho and json build theirs: a new string, not the interned one.
    name = "".join(["attribute_", "named_at_run_time"])
    before = sys.getrefcount(name)
    assert not hasattr(Probe(), name)
    assert sys.getrefcount(name) == before + 1  # the method cache keeps the name it looked up
    release_free_memory()
    assert sys.getrefcount(name) == before
