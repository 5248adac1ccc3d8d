"""The worker's token callback in C (``relay.c``, built by the package's install), loaded with cffi.

With the relay, the runtime's thread writes each token's frame to the event pipe without entering Python; only
FINISH and ERROR reach the binding's Python callback. Without it (not built), every callback goes through
Python as before: same frames, same behaviour, more CPU per token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cffi import FFI

__all__ = ["Relay", "relay_library_path"]

_CDEF = """
typedef int (*result_callback_t)(void *result, void *userdata, int state);
void relay_setup(int fd, result_callback_t other);
void relay_begin_run(int token_cap);
int relay_tokens(void);
int relay_write_error(void);
int relay_callback(void *result, void *userdata, int state);
"""
_MODULE = "rkllm_mqtt.runtime.relay._librelay"


def relay_library_path() -> Path | None:
    """The built relay library, or None when this installation has none."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is not None and spec.origin is not None and Path(spec.origin).is_file():
        return Path(spec.origin)
    return None


class Relay:
    """The C callback writing token frames to ``event_fd``; one per worker."""

    def __init__(self, library_path: Path, event_fd: int) -> None:
        self.library_path = library_path
        self.event_fd = event_fd
        self._ffi: Any = None
        self._lib: Any = None
        self._other: Any = None

    @classmethod
    def load(cls, event_fd: int) -> Relay | None:
        """The relay on ``event_fd``, or None when the library is not built (or cannot be loaded)."""
        path = relay_library_path()
        if path is None:
            return None
        relay = cls(path, event_fd)
        try:
            relay.open()
        except OSError:
            return None
        return relay

    def open(self) -> None:
        ffi = FFI()
        ffi.cdef(_CDEF)
        self._lib = ffi.dlopen(str(self.library_path))
        self._ffi = ffi

    def callback_address(self) -> int:
        """The address of the C callback, to register with the runtime."""
        return int(self._ffi.cast("uintptr_t", self._lib.relay_callback))

    def setup(self, other_states_address: int) -> None:
        """Write frames to the event pipe; hand every other state to the callback at ``other_states_address``."""
        self._other = self._ffi.cast("result_callback_t", other_states_address)
        self._lib.relay_setup(self.event_fd, self._other)

    def begin_run(self, token_cap: int) -> None:
        """Before each rkllm_run: reset the token count; ``token_cap`` > 0 enforces a cap (the 1.2 layout)."""
        self._lib.relay_begin_run(token_cap)

    def tokens(self) -> int:
        """Tokens (NORMAL callbacks with text) of the current or last run, as forwarded or past the cap."""
        return int(self._lib.relay_tokens())
