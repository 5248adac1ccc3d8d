"""What the runtime's single KV cache holds, so that no request sees another conversation's history.

A loaded model has one KV cache. A run with a session keeps its turn there (``keep_history``); the next run
continues it only when it belongs to the same session with the same system prompt. Everything else clears the
cache first. The rules are in docs/runtime.md ("Conversations").
"""

from __future__ import annotations

import threading


class KvCache:
    """The owner of the cache (a session id, or None when the last run kept no history), the system prompt its
    conversation started with, and whether its contents are unknown (after an error, or a ``forget``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: str | None = None
        self._system: str | None = None
        self._tools: str | None = None
        self._dirty = False
        self._running = False
        self._forget_pending = False

    @property
    def owner(self) -> str | None:
        return None if self._dirty else self._owner

    def reset(self) -> None:
        """A new worker: the cache is empty."""
        with self._lock:
            self._owner, self._system, self._dirty, self._forget_pending = None, None, False, False
            self._tools = None

    def holds(self, session: str | None, system: str | None, tools: str | None = None) -> bool:
        """Whether the cache holds the conversation ``session`` as it started (same system prompt and tools)."""
        with self._lock:
            return (
                session is not None
                and not self._dirty
                and self._owner == session
                and self._system == system
                and self._tools == tools
            )

    def begin(self, session: str | None, system: str | None, tools: str | None = None) -> bool:
        """A run starts; returns True when the cache must be cleared before it."""
        with self._lock:
            self._running = True
            self._forget_pending = False
            if self._dirty:
                return True
            if self._owner is None:
                return False  # the last run kept no history: nothing to clear
            return session != self._owner or system != self._system or tools != self._tools

    def end(self, session: str | None, system: str | None, *, dirty: bool, tools: str | None = None) -> None:
        """The run ended; ``dirty`` when its effect on the cache is unknown (an error, a crash, a hang)."""
        with self._lock:
            self._running = False
            self._dirty = dirty or self._forget_pending
            self._owner = session
            self._system = system
            self._tools = tools
            self._forget_pending = False

    def forget(self, session: str | None) -> bool:
        """Forget ``session`` (None: whatever is held); True when the cache held it. A run in flight keeps
        its turn until it ends, then the cache is marked to be cleared."""
        with self._lock:
            if self._dirty or self._owner is None or (session is not None and self._owner != session):
                return False
            if self._running:
                self._forget_pending = True
            else:
                self._dirty = True
            return True
