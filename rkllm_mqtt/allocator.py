"""The daemon keeps its Python objects in the C library's heap (``PYTHONMALLOC=malloc``), set by starting again.

Python's own small-object allocator takes memory in 1 MiB arenas and gives an arena back only once every object
in it is gone. A flood of prompts fills dozens of arenas with short-lived messages, and the few objects that
outlive it (a counter, a timestamp, the last request's state) stay scattered among them: after a 50,000-prompt
flood the daemon stayed 20-28 MB above its idle size although its live objects were back to the idle count. In
the C library's heap a survivor keeps one 4 KiB page, and ``malloc_trim`` (:mod:`rkllm_mqtt.bridge.memory`)
returns the rest: the same floods then settle within 0-9 MB of idle. The price is a little CPU per token (about
5%, docs/reliability.md).

The allocator is chosen before the interpreter starts, so ``serve`` executes itself again once with the
variable set (same process id: systemd and sd_notify see nothing). An allocator chosen by the environment is
kept, whatever it is: ``PYTHONMALLOC=pymalloc`` turns this off. The systemd unit sets the variable itself.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "PYTHONMALLOC"
CHOICE = "malloc"


def use_c_heap() -> None:
    """Execute this command again with the C library's allocator, unless the environment chose one already.

    Returns only when nothing was done (or the new start failed to begin, which leaves this process running)."""
    original = getattr(sys, "orig_argv", None)
    if VARIABLE in os.environ or not original or not sys.executable:
        return
    os.environ[VARIABLE] = CHOICE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, original)
    except OSError:
        del os.environ[VARIABLE]  # run on as started: the allocator only matters after a flood
