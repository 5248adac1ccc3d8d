"""The durable record of settled request ids: what this node has answered, kept across a crash.

A request is *settled* once its final response is with the broker (or it was handed to a peer). Its id is
written here before the broker is told the prompt was received (the PUBACK), so that a prompt the broker
delivers again after a crash is recognised and not answered a second time.

The final itself is written here first (:meth:`SettledLedger.record_final`, synced) and only then published:
a crash between the two cannot lose it, because on the next start every final recorded and not yet settled is
published again (:meth:`SettledLedger.unsettled_finals`) with the same bytes, and its id already counts as
answered. A client may then see the same final twice, byte for byte, as QoS 1 allows; never two different ones.

The file is append-only, one record a line: ``<unix time> <request id>\\n`` (settled), or
``<unix time> <request id> <base64 JSON of topic, payload, correlation data>\\n`` (a final on its way). Each
append is followed by ``fdatasync``, so a record that ``settle()`` returned for survives a power cut. A crash
can tear the last line:
on opening, a last line without its newline, and any line that does not parse, are dropped. The file is
compacted (rewritten to a temporary file, synced, renamed over) on opening and whenever it has grown to twice
the records it keeps, so its size stays bounded and a settle costs one small write and one sync.

Bounded twice: at most ``keep`` ids, none older than ``max_age_s`` (the broker stops redelivering a prompt once
the session it was queued for expires, so older ids are of no use).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from rkllm_mqtt.bridge.settled_ids import KEY_BYTES, SettledIds

log = structlog.get_logger(__name__)

DEFAULT_KEEP = 10_000
# Well beyond the transport's session expiry (one hour): a redelivery cannot come later than that.
DEFAULT_MAX_AGE_S = 24 * 3600.0
FILE_PREFIX = "settled-"
FILE_SUFFIX = ".log"


@dataclass(frozen=True)
class PendingFinal:
    """A final response (or a prompt handed to a peer) recorded before it was published, not known to have
    reached the broker."""

    request_id: str
    topic: str
    payload: bytes
    correlation: bytes | None
    response_topic: str | None = None
    handoff: str | None = None  # the hand-off token of a prompt forwarded to a peer

    def encode(self) -> str:
        body = {
            "topic": self.topic,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "correlation": base64.b64encode(self.correlation).decode("ascii") if self.correlation else None,
            "response_topic": self.response_topic,
            "handoff": self.handoff,
        }
        return base64.b64encode(json.dumps(body, separators=(",", ":")).encode()).decode("ascii")

    @classmethod
    def decode(cls, request_id: str, text: str) -> PendingFinal | None:
        try:
            body = json.loads(base64.b64decode(text, validate=True))
            topic, payload, correlation = body["topic"], body["payload"], body["correlation"]
            response_topic, handoff = body.get("response_topic"), body.get("handoff")
            if not isinstance(topic, str) or not isinstance(payload, str):
                return None
            return cls(
                request_id,
                topic,
                base64.b64decode(payload, validate=True),
                base64.b64decode(correlation, validate=True) if isinstance(correlation, str) else None,
                response_topic if isinstance(response_topic, str) else None,
                handoff if isinstance(handoff, str) else None,
            )
        except (ValueError, TypeError, KeyError, binascii.Error):
            return None


SYSTEM_STATE_DIR = Path("/var/lib/rkllm-mqtt")


def resolve_state_dir(configured: Path | None) -> Path:
    """Where the daemon keeps its state: the setting, else systemd's StateDirectory, else a per-user directory.

    systemd passes the StateDirectory it created in ``$STATE_DIRECTORY``; outside systemd the system directory is
    used when it exists and is writable (never created here: that is the package's or systemd's job).
    """
    if configured is not None:
        return configured
    from_systemd = os.environ.get("STATE_DIRECTORY")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    if SYSTEM_STATE_DIR.is_dir() and os.access(SYSTEM_STATE_DIR, os.W_OK | os.X_OK):
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "rkllm-mqtt"


def ledger_path(state_dir: Path, node_id: str) -> Path:
    """One file per node id: several nodes may share a state directory (tests, one host in a cluster)."""
    return state_dir / f"{FILE_PREFIX}{node_id}{FILE_SUFFIX}"


def _parse(line: bytes) -> tuple[float, str, PendingFinal | None] | None:
    """A record, or None for anything that is not one (a torn or corrupted line)."""
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        return None
    if len(fields) not in (2, 3) or not all(fields):
        return None
    try:
        when = float(fields[0])
    except ValueError:
        return None
    if not math.isfinite(when):
        return None
    request_id = fields[1]
    if len(request_id) > KEY_BYTES:
        return None
    if len(fields) == 2:
        return when, request_id, None
    pending = PendingFinal.decode(request_id, fields[2])
    return None if pending is None else (when, request_id, pending)


class SettledLedger:
    """Settled request ids in memory (for ``contains``) and on disk (for the next start)."""

    def __init__(
        self,
        path: Path,
        *,
        keep: int = DEFAULT_KEEP,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.keep = keep
        self.max_age_s = max_age_s
        self.clock = clock
        self._ids = SettledIds(max(keep, 1))  # allocated once, whole: see settled_ids for why
        self._pending: dict[str, PendingFinal] = {}
        self._unsynced = False  # records written and not yet synced to the disk
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._records_in_file = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def open(self) -> None:
        """Read what a previous run recorded (dropping a torn last line), compact, and open for appending."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            dropped = 0
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                data = b""
            lines = data.split(b"\n")
            # The part after the last newline is a record whose write was cut short: never complete, ignored.
            if lines and lines[-1] != b"":
                dropped += 1
            for line in lines[:-1]:
                record = _parse(line)
                if record is None:
                    dropped += 1
                    continue
                when, request_id, pending = record
                self._remember(request_id, when, pending)
            self._trim()
            self._rewrite()
            log.info(
                "ledger_opened",
                path=str(self.path),
                ids=len(self._ids),
                unsettled_finals=len(self._pending),
                dropped_lines=dropped,
            )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- use --------------------------------------------------------------------------------------------

    def contains(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._pending:
                return True
            when = self._ids.when(request_id)
            return when is not None and self.clock() - when <= self.max_age_s

    def settle(self, request_id: str, *, durable: bool = True) -> None:
        """Record ``request_id`` as settled; with ``durable`` returns once the record is on disk.

        Not durable is for the mark after a recorded final reached the broker: a power cut that loses it only
        makes the next start publish that final once more, with the same bytes."""
        self._append(request_id, None, durable=durable)

    def record_final(
        self,
        request_id: str,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        *,
        durable: bool = True,
        response_topic: str | None = None,
        handoff: str | None = None,
    ) -> None:
        """Record a final before it is published: from now on ``request_id`` counts as answered.

        Written, the record survives the process (the kernel has it); ``durable`` also waits for the disk, which
        only a power cut needs. A caller that records without it calls :meth:`sync` before acknowledging."""
        pending = PendingFinal(request_id, topic, payload, correlation, response_topic, handoff)
        self._append(request_id, pending, durable=durable)

    def sync(self) -> None:
        """Put every record written so far on the disk (one ``fdatasync`` for all of them; none when clean).

        The flush runs without the lock, on a duplicate of the descriptor: appends go on meanwhile (the next sync
        covers them) instead of waiting for the disk, and a rewrite that replaces the file meanwhile syncs the
        new file itself."""
        with self._lock:
            if self._fd is None or not self._unsynced:
                return
            fd = os.dup(self._fd)
            self._unsynced = False
        try:
            os.fdatasync(fd)
        except OSError:
            with self._lock:
                self._unsynced = True
            raise
        finally:
            os.close(fd)

    def unsettled_finals(self) -> list[PendingFinal]:
        """Finals recorded and not known to have reached the broker (from before a crash): publish them again."""
        with self._lock:
            return list(self._pending.values())

    def _append(self, request_id: str, pending: PendingFinal | None, *, durable: bool) -> None:
        if (
            not request_id
            or len(request_id) > KEY_BYTES
            or any(ch.isspace() for ch in request_id)
            or not request_id.isascii()
        ):
            raise ValueError(f"not a recordable request id: {request_id!r}")
        line = f"{self.clock():.3f} {request_id}" + (f" {pending.encode()}" if pending is not None else "")
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the ledger is not open")
            os.write(self._fd, (line + "\n").encode("ascii"))
            if durable:
                os.fdatasync(self._fd)
            self._unsynced = not durable
            self._remember(request_id, self.clock(), pending)
            self._records_in_file += 1
            self._trim()
            # Twice what a rewrite would keep: each rewrite is paid for by as many appends (never one per append,
            # also when many finals are on their way at once).
            if self._records_in_file >= 2 * max(self.keep, len(self._ids) + len(self._pending), 1):
                self._rewrite()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids) + len(self._pending)

    # -- internals (lock held) --------------------------------------------------------------------------

    def _remember(self, request_id: str, when: float, pending: PendingFinal | None) -> None:
        # Settled ids in order of settling (what trimming drops first); finals on their way apart, never dropped.
        self._ids.discard(request_id)
        if pending is not None:
            self._pending[request_id] = pending
        else:
            self._pending.pop(request_id, None)
            self._ids.add(request_id, when)

    def _trim(self) -> None:
        horizon = self.clock() - self.max_age_s
        while (oldest := self._ids.oldest()) is not None:
            if len(self._ids) <= self.keep and oldest[1] >= horizon:
                break
            self._ids.pop_oldest()

    def _rewrite(self) -> None:
        """Replace the file by the records kept: temporary file, fsync, rename, fsync of the directory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        now = self.clock()
        lines = [f"{when:.3f} {request_id}\n" for request_id, when in self._ids.items()]
        lines.extend(f"{now:.3f} {request_id} {pending.encode()}\n" for request_id, pending in self._pending.items())
        body = "".join(lines).encode("ascii")
        fd, tmp_name = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(body)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._records_in_file = len(self._ids) + len(self._pending)
