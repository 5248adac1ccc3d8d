from __future__ import annotations

import json
import logging

import pytest
import structlog

from rkllm_mqtt.logs import DROPPED_EVENT, RepeatLimiter, configure_logging


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


def test_a_flood_of_one_event_is_cut_to_the_window_limit_and_the_rest_is_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = _Clock()
    limiter = RepeatLimiter(frozenset({"request_refused"}), window_s=10.0, per_window=3, clock=clock)
    log = structlog.wrap_logger(structlog.PrintLogger(), processors=[limiter, structlog.processors.JSONRenderer()])
    for index in range(10):
        log.info("request_refused", request_id=f"r{index}")
        log.info("request_queued", request_id=f"q{index}")  # not flood-prone: never limited
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["request_id"] for p in printed if p["event"] == "request_refused"] == ["r0", "r1", "r2"]
    assert len([p for p in printed if p["event"] == "request_queued"]) == 10

    clock.now += 10.0
    configure_logging("info", "json")  # the dropped count goes through the daemon's own logger
    try:
        limiter.report()
        dropped = [p for p in _lines(capsys) if p["event"] == DROPPED_EVENT]
        assert dropped == [{**dropped[0], "dropped_event": "request_refused", "count": 7, "window_s": 10.0}]
        limiter.report()  # counted once
        assert [p for p in _lines(capsys) if p["event"] == DROPPED_EVENT] == []
        log.info("request_refused", request_id="next")  # a new window: allowed again
        assert json.loads(capsys.readouterr().out)["request_id"] == "next"
    finally:
        logging.getLogger().handlers[:] = []


def test_the_configured_logger_drops_a_flood_before_formatting_it(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        log = structlog.get_logger("flood")
        for index in range(500):
            log.warning("request_error", code="queue_full", request_id=f"f{index}")
        errors = [p for p in _lines(capsys) if p["event"] == "request_error"]
        assert 0 < len(errors) <= 20
    finally:
        logging.getLogger().handlers[:] = []
