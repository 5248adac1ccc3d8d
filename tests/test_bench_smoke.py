"""The benchmark's own helpers: percentiles, the /proc parsers, CPU accounting and the target checks.

Timings are benchmark output, never assertions: nothing here measures the bridge.
"""

from __future__ import annotations

import os
import time

import pytest

from bench.report import TARGETS, Target, dig, headline
from bench.stats import percentile, summary
from bench.sysinfo import (
    cpu_ns,
    machine_cpu_use,
    memory,
    parse_proc_stat_cpu,
    parse_stat_cpu_ticks,
    parse_status,
    stat_cpu_ticks,
)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(range(101)), 99) == 99.0


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_rounds_and_handles_empty() -> None:
    assert summary([]) == {"n": 0}
    result = summary([1.0, 2.0, 4.0])
    assert result["n"] == 3
    assert result["p50"] == 2.0
    assert result["mean"] == 2.333


def test_stat_parser_counts_fields_after_the_command_name() -> None:
    # A command name with spaces and a ')' must not shift the fields: utime 1234, stime 56.
    text = "4242 (evil) name (x) S 1 4242 4242 0 -1 4194304 100 0 0 0 1234 56 0 0 20 0 3 0 100 1000 200\n"
    assert parse_stat_cpu_ticks(text) == (1234, 56)


def test_status_parser_reads_sizes_in_kb() -> None:
    text = "Name:\tpython\nVmRSS:\t   46800 kB\nThreads:\t7\nvoluntary_ctxt_switches:\t12\nCpus_allowed_list:\t0-1\n"
    fields = parse_status(text)
    assert fields["VmRSS"] == 46800
    assert fields["Threads"] == 7
    assert fields["voluntary_ctxt_switches"] == 12
    assert "Name" not in fields
    assert "Cpus_allowed_list" not in fields


def test_machine_cpu_busy_and_steal() -> None:
    before = parse_proc_stat_cpu("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    after = parse_proc_stat_cpu("cpu  200 0 100 1500 10 0 0 40 0 0\n")
    assert before["steal"] == 40
    assert machine_cpu_use(before, after) == {"busy_percent": 17.6, "steal_percent": 0.0}
    assert machine_cpu_use(after, after) == {}


def test_own_process_cpu_and_memory_are_read() -> None:
    pid = os.getpid()
    before = cpu_ns(pid)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn 50 ms of CPU
        pass
    assert cpu_ns(pid) - before >= 40_000_000
    ticks = sum(stat_cpu_ticks(pid))
    if ticks == 0 and time.process_time() >= 10 / os.sysconf("SC_CLK_TCK"):
        # At least ten ticks of CPU are spent by now (the burn alone is five), so a zero is the platform's, not
        # the sampling's: qemu-user, for one, answers /proc/<own pid>/stat with zeroed CPU fields.
        pytest.skip("this platform's /proc/<pid>/stat reports no CPU ticks (utime and stime read 0)")
    assert ticks > 0
    mem = memory(pid)
    assert 0 < mem["VmRSS"] <= mem["VmHWM"]


def test_targets_pass_miss_and_missing() -> None:
    target = Target("x", "<=", 1.0, "<= 1")
    assert target.check(0.9) == "PASS"
    assert target.check(1.1) == "MISS"
    assert target.check(None) == "n/a"
    assert Target("lost", "is", True, "nothing lost").check(False) == "MISS"


def test_headline_of_partial_results() -> None:
    results = {
        "latency": {"latency_ms": {"p50": 0.8, "p99": 1.2}, "lost": 0, "seq_ok": True},
        "broker_rtt": {"latency_ms": {"p50": 0.4, "p99": 0.6}},
        "burst": [{"queue_size": 8, "answered": 1000, "missing": 0, "answered_twice": 0, "complete": True}],
    }
    head = headline(results)
    assert head["latency_ratio_p50"] == 2.0
    assert head["latency_bridge_share_p50_ms"] == 0.4
    assert head["nothing_lost"] is True
    assert head["coalesced_tokens_per_s"] is None
    assert dig(results, "latency.latency_ms.p99") == 1.2
    assert dig(results, "latency.missing.p99") is None
    assert {t.key for t in TARGETS} <= set(head)
