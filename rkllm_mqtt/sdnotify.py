"""The systemd notification protocol (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd passes a datagram socket in ``NOTIFY_SOCKET`` and waits for
``READY=1``; with ``WatchdogSec=`` it also passes ``WATCHDOG_USEC`` and expects ``WATCHDOG=1``
more often than that. The protocol is newline-separated ``KEY=value`` lines in one datagram.

:meth:`SystemdNotifier.from_env` reads those variables and removes them from ``os.environ``, so a
child process (the runtime worker) can never speak for the daemon. Outside systemd every call is
a no-op, and a failure to send is logged once and never raised: the daemon must not fall over
because its supervisor went away.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import MutableMapping
from types import TracebackType

import structlog

__all__ = ["SystemdNotifier"]

# Longest a single send may block. systemd reads its notify socket promptly; a full queue means
# something is badly wrong, and a watchdog ping that cannot be delivered is as good as a missed one.
_SEND_TIMEOUT_S = 2.0
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux


def _parse_usec(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        usec = int(value.strip())
    except ValueError:
        return None
    return usec if usec > 0 else None


def _clean(value: object) -> str:
    # One datagram carries newline-separated assignments: a newline inside a value would start a new one.
    return str(value).replace("\r", " ").replace("\n", " ")


class SystemdNotifier:
    """Sends state changes to systemd. Build it with :meth:`from_env`; the constructor only assigns.

    ``address`` is the value of ``NOTIFY_SOCKET``: a file system path, or ``@name`` for a socket in
    the abstract namespace. ``watchdog_usec`` is ``WATCHDOG_USEC`` when the watchdog applies to this
    process. The socket is created by :meth:`open`, or on the first message.
    """

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self._warned = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog interval is taken only when ``WATCHDOG_PID`` is unset or names this process.
        With ``unset`` (the default) the three variables are removed from ``environ`` afterwards, so
        processes started later do not inherit them.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec = _parse_usec(env.get("WATCHDOG_USEC"))
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid is not None and watchdog_pid.strip() != str(os.getpid()):
            watchdog_usec = None
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(address, watchdog_usec)

    # -- state ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when running under a supervisor that listens (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        return self._address

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self._watchdog_usec is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, as systemd recommends.

        ``None`` when the service has no watchdog (or it is meant for another process).
        """
        if not self.watchdog_enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    # -- socket --------------------------------------------------------------------------------

    def _sockaddr(self) -> str | bytes:
        address = self._address or ""
        if address.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of the '@', no terminating NUL.
            return b"\0" + address[1:].encode()
        if address.startswith("/"):
            if len(os.fsencode(address)) >= _SUN_PATH_MAX:
                raise OSError(errno.ENAMETOOLONG, "notify socket path too long")
            return address
        raise OSError(errno.EAFNOSUPPORT, "unsupported notify socket address (only paths and '@name')")

    def open(self) -> None:
        """Create the datagram socket. Does nothing outside systemd or when already open."""
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._sock is not None or self._address is None or self._failed:
            return
        try:
            self._sockaddr()  # validate the address before creating anything
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec by default (PEP 446)
            sock.settimeout(_SEND_TIMEOUT_S)
        except OSError as exc:
            self._failed = True
            self._warn_once("sd_notify_unavailable", exc, None)
            return
        self._sock = sock

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> SystemdNotifier:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _warn_once(self, event: str, exc: BaseException, message: str | None) -> None:
        if self._warned:
            return
        self._warned = True
        # A fresh logger per (rare) warning: never one bound at import time to a stale configuration.
        structlog.get_logger(__name__).warning(event, address=self._address, error=str(exc), message=message)

    # -- messages ------------------------------------------------------------------------------

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one datagram; keys are upper-cased.

        Returns True when the datagram was sent. Never raises: outside systemd it returns False,
        and a failed send is logged once.
        """
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key.upper()}={_clean(value)}" for key, value in fields.items())
        with self._lock:
            self._open_locked()
            sock = self._sock
            if sock is None:
                return False
            try:
                sock.sendto(message.encode("utf-8"), self._sockaddr())
            except OSError as exc:  # includes the send timeout
                self._warn_once("sd_notify_failed", exc, message.split("\n", 1)[0])
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is finished (with an optional status line)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=…``: the one-line state shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is healthy. Only sent when a watchdog applies to this process."""
        if not self.watchdog_enabled:
            return False
        return self.notify(WATCHDOG=1)

    def watchdog_trigger(self) -> bool:
        """``WATCHDOG=trigger``: ask systemd to act as if the watchdog had expired."""
        return self.notify(WATCHDOG="trigger")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` timestamp systemd 253+ expects with it."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: the current start or stop step needs up to ``seconds`` more."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))
