"""The durable record of settled request ids: survives a reopen, ignores a torn write, stays bounded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_mqtt.bridge.ledger import SettledLedger, ledger_path, resolve_state_dir


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opened(path: Path, **kwargs: object) -> SettledLedger:
    ledger = SettledLedger(path, **kwargs)  # type: ignore[arg-type]
    ledger.open()
    return ledger


def test_settled_ids_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.settle("kitchen-1")
    ledger.settle("kitchen-2")
    assert ledger.contains("kitchen-1")
    assert not ledger.contains("kitchen-3")
    ledger.close()
    again = opened(path)
    assert again.contains("kitchen-1") and again.contains("kitchen-2")
    assert not again.contains("kitchen-3")
    assert len(again) == 2


def test_a_record_is_on_disk_when_settle_returns(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.settle("r-1")
    # No close, no flush: another reader sees the record at once.
    assert path.read_bytes().endswith(b" r-1\n")


def test_a_torn_last_line_is_ignored_and_later_records_stay_whole(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.settle("whole-1")
    ledger.close()
    # A crash in the middle of the second append: the id is cut short and the newline never written.
    with path.open("ab") as handle:
        handle.write(b"1000001.000 torn-2")
    again = opened(path)
    assert again.contains("whole-1")
    assert not again.contains("torn-2")
    assert not again.contains("torn")
    again.settle("next-3")
    again.close()
    third = opened(path)
    assert third.contains("next-3")
    assert not third.contains("torn-2")
    # The torn fragment did not swallow the record written after it.
    assert not any(b"torn" in line for line in path.read_bytes().splitlines())


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x00\n", b"not-a-number id\n", b"1000.0\n", b"1000.0 two words\n", b"\xff\xfe id\n", b"nan x\n"],
)
def test_corrupted_lines_are_skipped(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "settled.log"
    path.write_bytes(b"1000000.000 before\n" + garbage + b"1000000.500 after\n")
    ledger = opened(path, clock=FakeClock())
    assert ledger.contains("before") and ledger.contains("after")
    assert len(ledger) == 2


@pytest.mark.parametrize("durable", [True, False])
def test_a_killed_writer_leaves_a_readable_ledger(tmp_path: Path, durable: bool) -> None:
    """SIGKILL a process in the middle of settling ids: every id it reported settled is read back (a record
    written and not synced survives the process too: the kernel has it)."""
    path = tmp_path / "settled.log"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from rkllm_mqtt.bridge.ledger import SettledLedger\n"
        "ledger = SettledLedger(Path(sys.argv[1]))\n"
        "ledger.open()\n"
        "i = 0\n"
        "while True:\n"
        f"    ledger.record_final(f'id-{{i}}', 't', b'final', None, durable={durable})\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    reported = -1
    for line in proc.stdout:
        if not line.strip().isdigit():
            continue  # the ledger's own log line
        reported = int(line)
        if reported >= 200:
            break
    proc.kill()
    proc.wait()
    ledger = opened(path)
    for i in range(reported + 1):
        assert ledger.contains(f"id-{i}"), i
    assert len(ledger.unsettled_finals()) >= reported + 1


def test_kept_ids_are_bounded_by_count_and_the_file_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path, keep=10)
    for i in range(55):
        ledger.settle(f"id-{i}")
    assert len(ledger) == 10
    assert not ledger.contains("id-44")
    assert all(ledger.contains(f"id-{i}") for i in range(45, 55))
    # Compaction happens every 2 * keep appends: the file never holds more than that.
    assert len(path.read_bytes().splitlines()) < 20
    ledger.close()
    again = opened(path, keep=10)
    assert len(again) == 10
    assert again.contains("id-54") and not again.contains("id-44")


def test_old_ids_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "settled.log"
    ledger = opened(path, max_age_s=100.0, clock=clock)
    ledger.settle("old")
    clock.now += 60
    ledger.settle("newer")
    clock.now += 50
    assert not ledger.contains("old")
    assert ledger.contains("newer")
    ledger.close()
    again = opened(path, max_age_s=100.0, clock=clock)
    assert len(again) == 1 and again.contains("newer")


def test_a_settled_again_id_moves_to_the_newest_end(tmp_path: Path) -> None:
    ledger = opened(tmp_path / "settled.log", keep=2)
    ledger.settle("a")
    ledger.settle("b")
    ledger.settle("a")
    ledger.settle("c")
    assert ledger.contains("a") and ledger.contains("c") and not ledger.contains("b")


@pytest.mark.parametrize("bad", ["", "two words", "line\nbreak", "é"])
def test_unrecordable_ids_are_refused(tmp_path: Path, bad: str) -> None:
    ledger = opened(tmp_path / "settled.log")
    with pytest.raises(ValueError):
        ledger.settle(bad)


def test_settle_before_open_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        SettledLedger(tmp_path / "settled.log").settle("x")


def test_one_file_per_node(tmp_path: Path) -> None:
    assert ledger_path(tmp_path, "kitchen") != ledger_path(tmp_path, "garage")
    assert ledger_path(tmp_path, "kitchen").parent == tmp_path


def test_state_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_state_dir(tmp_path / "configured") == tmp_path / "configured"
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/from-systemd:{tmp_path}/second")
    assert resolve_state_dir(None) == tmp_path / "from-systemd"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    resolved = resolve_state_dir(None)
    system = Path("/var/lib/rkllm-mqtt")
    if system.is_dir() and os.access(system, os.W_OK):
        assert resolved == system
    else:
        assert resolved == tmp_path / "xdg" / "rkllm-mqtt"


def test_a_recorded_final_counts_as_answered_and_comes_back_until_settled(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.record_final("r-1", "rkllm/n/response/r-1", b'{"id": "r-1", "text": "h\xc3\xa9"}', b"\x00corr")
    ledger.record_final("r-2", "rkllm/n/response/r-2", b"{}", None)
    assert ledger.contains("r-1") and ledger.contains("r-2")
    ledger.settle("r-2", durable=False)
    ledger.close()
    # The process died before the broker acknowledged r-1's final: the next start publishes it again.
    again = opened(path)
    pending = again.unsettled_finals()
    assert [(p.request_id, p.topic, p.payload, p.correlation) for p in pending] == [
        ("r-1", "rkllm/n/response/r-1", b'{"id": "r-1", "text": "h\xc3\xa9"}', b"\x00corr")
    ]
    assert again.contains("r-1") and again.contains("r-2")
    again.settle("r-1", durable=False)
    again.close()
    third = opened(path)
    assert third.unsettled_finals() == []
    assert third.contains("r-1")


def test_a_final_still_on_its_way_is_never_trimmed(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "settled.log"
    ledger = opened(path, keep=3, max_age_s=10.0, clock=clock)
    ledger.record_final("on-its-way", "t", b"x", None)
    for i in range(20):
        clock.now += 5
        ledger.settle(f"id-{i}")
    assert ledger.contains("on-its-way")
    ledger.close()
    assert [p.request_id for p in opened(path, keep=3, max_age_s=10.0, clock=clock).unsettled_finals()] == [
        "on-its-way"
    ]


def test_a_torn_final_record_is_not_published_again(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.record_final("whole", "t", b"payload", None)
    ledger.close()
    whole_line = path.read_bytes().splitlines()[-1]
    with path.open("ab") as handle:
        handle.write(whole_line.replace(b"whole", b"torn")[: len(whole_line) // 2])
    again = opened(path)
    assert [p.request_id for p in again.unsettled_finals()] == ["whole"]
    assert not again.contains("torn")


def test_sync_puts_unsynced_records_on_disk_once(tmp_path: Path) -> None:
    ledger = opened(tmp_path / "settled.log")
    ledger.record_final("a", "t", b"x", None, durable=False)
    ledger.settle("a", durable=False)
    ledger.sync()
    ledger.sync()  # clean: nothing to do
    ledger.close()
    again = opened(tmp_path / "settled.log")
    assert again.contains("a") and again.unsettled_finals() == []


def test_a_recorded_hand_off_keeps_its_reply_topic_and_token(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path)
    ledger.record_final(
        "g1", "rkllm/peer/prompt", b'{"id": "g1"}', b"c", response_topic="rkllm/reply/x", handoff="ab" * 16
    )
    ledger.close()
    (pending,) = opened(path).unsettled_finals()
    assert (pending.topic, pending.response_topic, pending.handoff) == ("rkllm/peer/prompt", "rkllm/reply/x", "ab" * 16)


def test_many_finals_on_their_way_do_not_make_every_append_rewrite_the_file(tmp_path: Path) -> None:
    path = tmp_path / "settled.log"
    ledger = opened(path, keep=10)
    inode = path.stat().st_ino
    rewrites = 0
    for i in range(200):
        ledger.record_final(f"f-{i}", "t", b"x", None, durable=False)
        if path.stat().st_ino != inode:  # a rewrite renames a new file over the old one
            rewrites += 1
            inode = path.stat().st_ino
    assert rewrites <= 8, rewrites
    assert len(ledger.unsettled_finals()) == 200
