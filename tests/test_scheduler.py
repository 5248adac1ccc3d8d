"""The scheduler alone: a fake runtime that honours the cancel token and a fake reporter; no broker, no process.

The fake runtime is driven step by step by the test (a run waits for permission before each token), so every
ordering is chosen by the test, never by timing.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from rkllm_mqtt.core.jobs import Admitted, GenerationRequest, GenerationResult, Job, Refused
from rkllm_mqtt.core.scheduler import Scheduler, SchedulerSnapshot
from rkllm_mqtt.errors import RequestError

from .fakes import WAIT_S, FakeRun, FakeRuntime


@dataclass
class FakeReporter:
    events: list[tuple[str, object]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    times: tuple[float, float] | None = None
    fail_on: str | None = None
    flushes: int = 0
    on_started: Callable[[], None] | None = None

    def queued(self, job: Job, position: int) -> None:
        self._event("queued", position)

    def started(self, job: Job) -> None:
        self._event("started", None)
        if self.on_started is not None:
            self.on_started()

    def text(self, job: Job, chunk: str) -> None:
        self._event("text", chunk)

    def finished(self, job: Job, result: GenerationResult, queued_ms: float, total_ms: float) -> None:
        self.events.append(("finished", result.error_code))
        self.result = result
        self.times = (queued_ms, total_ms)
        self.done.set()

    def _event(self, kind: str, value: object) -> None:
        self.events.append((kind, value))
        if self.fail_on == kind:
            raise RuntimeError(f"reporter broke on {kind}")

    def wait(self) -> GenerationResult:
        assert self.done.wait(WAIT_S), "the job never finished"
        assert self.result is not None
        return self.result

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_ids = itertools.count()


def make_job(
    job_id: str | None = None, *, reporter: FakeReporter | None = None, source: str = "mqtt", **request: object
) -> tuple[Job, FakeReporter]:
    reporter = reporter or FakeReporter()
    fields: dict[str, object] = {"prompt": "hi", "timeout_s": 60.0, **request}
    job = Job(
        id=job_id or f"j{next(_ids)}",
        request=GenerationRequest(**fields),  # type: ignore[arg-type]
        reporter=reporter,
        received_at=1000.0,
        source=source,
    )
    return job, reporter


class Observer:
    def __init__(self) -> None:
        self.changes = 0

    def on_change(self) -> None:
        self.changes += 1


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def scheduler(runtime: FakeRuntime) -> Iterator[Scheduler]:
    sched = Scheduler(runtime, queue_size=2, hang_grace_s=1.0)
    sched.start()
    yield sched
    for run in runtime.runs:
        run.finish()
    sched.shutdown(grace_s=WAIT_S)


def submit(scheduler: Scheduler, job: Job) -> int:
    admission = scheduler.submit(job)
    assert isinstance(admission, Admitted), admission
    return admission.position


# -- a run from submit to finished ---------------------------------------------------------------------------


def test_a_job_is_queued_started_streamed_and_finished_once(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    job, reporter = make_job()
    assert submit(scheduler, job) == 0
    assert reporter.kinds[0] == "queued"  # before submit returned
    runtime.next_run(1).finish()
    result = reporter.wait()
    assert result.error_code is None and result.text == "abc"
    assert reporter.events == [
        ("queued", 0),
        ("started", None),
        ("text", "a"),
        ("text", "b"),
        ("text", "c"),
        ("finished", None),
    ]


def test_times_are_measured_on_the_injected_clock(runtime: FakeRuntime) -> None:
    clock = Clock()
    sched = Scheduler(runtime, queue_size=2, hang_grace_s=1.0, clock=clock)
    sched.start()
    try:
        job, reporter = make_job()
        clock.now = 1000.5  # half a second in the queue
        submit(sched, job)
        run = runtime.next_run(1)
        clock.now = 1002.0
        run.finish()
        reporter.wait()
        assert reporter.times is not None
        queued_ms, total_ms = reporter.times
        assert queued_ms == 500.0
        assert total_ms == 2000.0
    finally:
        sched.shutdown(grace_s=WAIT_S)


def test_jobs_run_one_at_a_time_in_fifo_order(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    first, r1 = make_job("first")
    second, r2 = make_job("second")
    third, r3 = make_job("third")
    assert submit(scheduler, first) == 0
    run1 = runtime.next_run(1)
    assert submit(scheduler, second) == 1
    assert submit(scheduler, third) == 2
    assert scheduler.snapshot().queue_depth == 2
    run1.finish()
    r1.wait()
    runtime.next_run(2).finish()
    r2.wait()
    runtime.next_run(3).finish()
    r3.wait()
    assert [run.request.prompt for run in runtime.runs] == ["hi", "hi", "hi"]
    assert [r.kinds.index("started") for r in (r1, r2, r3)] == [1, 1, 1]
    assert runtime.max_active == 1
    assert [id(run.cancel) for run in runtime.runs] == [id(first.cancel), id(second.cancel), id(third.cancel)]


# -- admission -------------------------------------------------------------------------------------------


def test_a_full_queue_refuses_with_queue_full_and_reports_nothing(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    submit(scheduler, make_job()[0])
    runtime.next_run(1)
    submit(scheduler, make_job()[0])
    submit(scheduler, make_job()[0])
    job, reporter = make_job()
    admission = scheduler.submit(job)
    assert isinstance(admission, Refused) and admission.code == "queue_full"
    assert "limits.queue_size = 2" in admission.message
    assert reporter.events == []
    snap = scheduler.snapshot()
    assert (snap.requests_total, snap.errors_total, snap.rejected_total) == (4, 1, 0)


def test_a_pending_id_cannot_be_used_again(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    submit(scheduler, make_job("same")[0])
    runtime.next_run(1)
    running_dup = scheduler.submit(make_job("same")[0])
    submit(scheduler, make_job("other")[0])
    queued_dup = scheduler.submit(make_job("other")[0])
    for admission in (running_dup, queued_dup):
        assert isinstance(admission, Refused) and admission.code == "invalid_request"
    snap = scheduler.snapshot()
    assert (snap.errors_total, snap.rejected_total) == (0, 2)  # the client's mistake, not the bridge's


def test_a_failed_runtime_refuses_with_not_ready_naming_the_error(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.status = "failed"
    runtime.last_error = "model not found: /m.rkllm"
    admission = scheduler.submit(make_job()[0])
    assert isinstance(admission, Refused) and admission.code == "not_ready"
    assert "model not found: /m.rkllm" in admission.message


def test_unsupported_requests_are_refused_with_the_runtimes_reason(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.abi = "1.2"
    admission = scheduler.submit(make_job(sampling={"temperature": 0.5})[0])
    assert admission == Refused("unsupported", "sampling needs runtime 1.3")
    submit(scheduler, make_job()[0])  # without sampling it runs


def test_after_shutdown_nothing_is_admitted(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, queue_size=2, hang_grace_s=1.0)
    sched.start()
    sched.shutdown(grace_s=WAIT_S)
    admission = sched.submit(make_job()[0])
    assert isinstance(admission, Refused) and admission.code == "not_ready"
    assert sched.snapshot().stopping


def test_a_zero_queue_admits_only_when_idle(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, queue_size=0, hang_grace_s=1.0)
    sched.start()
    try:
        job, reporter = make_job()
        submit(sched, job)
        run = runtime.next_run(1)
        refused = sched.submit(make_job()[0])
        assert isinstance(refused, Refused) and refused.code == "queue_full"
        run.finish()
        reporter.wait()
    finally:
        sched.shutdown(grace_s=WAIT_S)


# -- abort and clear ---------------------------------------------------------------------------------------


def test_abort_of_a_queued_job_finishes_it_at_once_without_running_it(
    scheduler: Scheduler, runtime: FakeRuntime
) -> None:
    first, r1 = make_job()
    queued, r2 = make_job()
    submit(scheduler, first)
    run1 = runtime.next_run(1)
    submit(scheduler, queued)
    assert scheduler.abort(queued.id) == "queued"
    assert r2.done.is_set()  # at once, before the running job ends
    assert r2.result is not None and r2.result.error_code == "aborted" and r2.result.finish_reason == "abort"
    assert r2.kinds == ["queued", "finished"]
    assert queued.cancel.reason == "abort"
    run1.finish()
    r1.wait()
    assert len(runtime.runs) == 1


def test_abort_of_the_running_job_by_id_or_without_id(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    for target in ("by-id", None):
        job, reporter = make_job("by-id" if target else None)
        submit(scheduler, job)
        run = runtime.next_run(len(runtime.runs) + 1)
        run.allow(1)
        assert scheduler.abort(target) == "running"
        result = reporter.wait()
        assert result.error_code == "aborted"
        assert reporter.kinds[-1] == "finished" and reporter.kinds.count("finished") == 1
    snap = scheduler.snapshot()
    assert (snap.errors_total, snap.rejected_total, snap.last_error) == (0, 0, None)


def test_abort_of_an_unknown_id_or_when_idle(scheduler: Scheduler) -> None:
    assert scheduler.abort("nobody") == "not_found"
    assert scheduler.abort(None) == "idle"


def test_clear_forgets_through_the_runtime(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    assert scheduler.clear("held") is True
    assert scheduler.clear(None) is False
    assert runtime.forgotten == ["held", None]


# -- failures ------------------------------------------------------------------------------------------------


def test_an_exception_in_the_runtime_still_finishes_the_job_once(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.raise_on_generate = ValueError("boom")
    job, reporter = make_job()
    submit(scheduler, job)
    result = reporter.wait()
    assert result.error_code == "runtime_error"
    assert reporter.kinds == ["queued", "started", "finished"]
    runtime.raise_on_generate = None
    after, r2 = make_job()
    submit(scheduler, after)  # the runner survived
    runtime.next_run(1).finish()
    assert r2.wait().error_code is None


def test_a_request_error_from_the_runtime_keeps_its_code(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.raise_on_generate = RequestError("not_ready", "runtime is restarting")
    job, reporter = make_job()
    submit(scheduler, job)
    result = reporter.wait()
    assert (result.error_code, result.error_message) == ("not_ready", "runtime is restarting")


def test_a_broken_reporter_does_not_lose_the_final(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    for kind in ("queued", "started", "text"):
        reporter = FakeReporter(fail_on=kind)
        job, _ = make_job(reporter=reporter)
        submit(scheduler, job)
        runtime.next_run(len(runtime.runs) + 1).finish()
        assert reporter.wait().error_code is None
        assert reporter.kinds.count("finished") == 1


def test_runtime_failures_count_as_errors_and_set_last_error(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    def fail(run: FakeRun) -> None:
        raise RequestError("runtime_crashed", "worker killed by SIGSEGV")

    runtime.before_run = fail
    job, reporter = make_job()
    submit(scheduler, job)
    assert reporter.wait().error_code == "runtime_crashed"
    snap = scheduler.snapshot()
    assert (snap.errors_total, snap.rejected_total, snap.last_error) == (1, 0, "worker killed by SIGSEGV")


def test_front_door_rejections_count_by_kind(scheduler: Scheduler) -> None:
    observer = Observer()
    scheduler.observe(observer)
    scheduler.record_rejection("invalid_json")
    scheduler.record_rejection("forbidden_topic")
    scheduler.record_rejection("queue_full")
    snap = scheduler.snapshot()
    assert (snap.requests_total, snap.rejected_total, snap.errors_total, snap.last_error) == (3, 2, 1, None)
    assert observer.changes == 3


# -- state -------------------------------------------------------------------------------------------------


def test_snapshot_shows_the_running_job_and_the_last_speed(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    observer = Observer()
    scheduler.observe(observer)
    assert scheduler.snapshot() == SchedulerSnapshot(None, None, 0, 0, 0, 0, None, None, None, False)
    job, reporter = make_job("http-1", source="http")
    submit(scheduler, job)
    run = runtime.next_run(1)
    snap = scheduler.snapshot()
    assert (snap.current_id, snap.current_source, snap.busy) == ("http-1", "http", True)
    run.finish()
    reporter.wait()
    snap = scheduler.snapshot()
    assert snap.current_id is None or snap.current_id == "http-1"  # the runner clears it after the final
    assert (snap.tokens_per_s, snap.ttft_ms) == (30.0, 5.0)
    assert observer.changes >= 2  # queued, started (and finished)


def test_health_is_read_without_side_effects_and_sees_a_wedged_run(runtime: FakeRuntime) -> None:
    clock = Clock()
    sched = Scheduler(runtime, queue_size=2, hang_grace_s=1.0, clock=clock)
    assert not sched.healthy()  # no runner yet
    sched.start()
    try:
        assert sched.healthy()
        job, reporter = make_job(timeout_s=10.0)
        submit(sched, job)
        run = runtime.next_run(1)
        assert sched.healthy(clock.now + 70.0)  # within timeout + hang grace + margin
        assert not sched.healthy(clock.now + 72.0)
        run.finish()
        reporter.wait()
    finally:
        sched.shutdown(grace_s=WAIT_S)


def test_a_runtime_that_changed_since_admission_refuses_at_the_start(
    scheduler: Scheduler, runtime: FakeRuntime
) -> None:
    first, _ = make_job()
    submit(scheduler, first)
    run = runtime.next_run(1)
    hot, r2 = make_job(sampling={"temperature": 0.5})
    submit(scheduler, hot)  # admitted on 1.3
    runtime.abi = "1.2"  # the runtime restarted with another layout
    run.finish()
    result = r2.wait()
    assert result.error_code == "unsupported"
    assert r2.kinds == ["queued", "started", "finished"]
    assert scheduler.snapshot().errors_total == 1


def test_a_job_started_while_the_runtime_loads_waits_for_it(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.status = "loading"
    job, reporter = make_job()
    submit(scheduler, job)
    assert runtime.settling.wait(WAIT_S)  # the runner waits for the runtime
    runtime.status = "ready"
    runtime.settled.set()
    runtime.next_run(1).finish()
    assert reporter.wait().error_code is None


def test_waiting_for_the_runtime_does_not_count_against_the_run_on_the_watchdog(runtime: FakeRuntime) -> None:
    clock = Clock()
    sched = Scheduler(runtime, queue_size=2, hang_grace_s=1.0, clock=clock)
    sched.start()
    try:
        runtime.status = "loading"
        job, reporter = make_job(timeout_s=100.0)
        submit(sched, job)
        assert runtime.settling.wait(WAIT_S)
        clock.now += 90.0  # the runtime took 90 s to load
        runtime.status = "ready"
        runtime.settled.set()
        run = runtime.next_run(1)
        assert sched.healthy(clock.now + 150.0)  # 90 s of waiting are not part of the run's bound
        assert not sched.healthy(clock.now + 162.0)
        run.finish()
        reporter.wait()
    finally:
        sched.shutdown(grace_s=WAIT_S)


def test_an_abort_while_the_runtime_loads_never_reaches_it(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    runtime.status = "restarting"
    job, reporter = make_job()
    submit(scheduler, job)
    assert scheduler.abort(job.id) in ("queued", "running")
    result = reporter.wait()
    assert result.error_code == "aborted"
    assert runtime.runs == []


def test_a_buffering_reporter_flushes_through_the_sink(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    class Buffering(FakeReporter):
        def flush_deadline(self, job: Job) -> float | None:
            return 42.0

        def flush(self, job: Job) -> None:
            self.flushes += 1

    reporter = Buffering()
    job, _ = make_job(reporter=reporter)
    submit(scheduler, job)
    runtime.next_run(1).finish()
    reporter.wait()
    assert runtime.deadlines == [42.0]
    assert reporter.flushes == 1  # the fake runtime flushes once at the end


def test_a_plain_reporter_gets_every_piece_at_once(scheduler: Scheduler, runtime: FakeRuntime) -> None:
    job, reporter = make_job()
    submit(scheduler, job)
    runtime.next_run(1).finish()
    reporter.wait()
    assert runtime.deadlines == [None]


# -- shutdown --------------------------------------------------------------------------------------------


def test_shutdown_aborts_queued_jobs_and_cancels_the_running_one_after_the_grace(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, queue_size=4, hang_grace_s=1.0)
    sched.start()
    running, r1 = make_job()
    queued, r2 = make_job()
    submit(sched, running)
    runtime.next_run(1)
    submit(sched, queued)
    sched.shutdown(grace_s=0.0)  # no grace: the running job is cancelled at once
    assert r1.wait().error_code == "aborted"
    assert running.cancel.reason == "shutdown"
    assert r2.wait().error_code == "aborted"
    assert r2.kinds == ["queued", "finished"]
    assert len(runtime.runs) == 1


def test_shutdown_lets_the_running_job_finish_within_the_grace(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, queue_size=4, hang_grace_s=1.0)
    sched.start()
    job, reporter = make_job()
    submit(sched, job)
    run = runtime.next_run(1)
    stopper = threading.Thread(target=sched.shutdown, args=(WAIT_S,))
    stopper.start()
    run.finish()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    assert reporter.wait().error_code is None
    assert not job.cancel.cancelled


# -- abort is never lost ----------------------------------------------------------------------------------

POINTS = ("queued", "on_started", "before_run", "before_first_token", "mid_stream", "after_finish")


@pytest.mark.parametrize("seed", [1, 2])
def test_an_abort_at_any_point_of_a_run_is_never_lost(seed: int) -> None:
    """Over 1,200 runs (in two seeds), an abort fired at every point of a run's life: each one before the finish
    ends the job ``aborted``; one after the finish leaves it ``done``; every job gets exactly one final."""
    rng = random.Random(seed)
    runtime = FakeRuntime(tokens=["t0", "t1", "t2", "t3"], free=True)
    sched = Scheduler(runtime, queue_size=4, hang_grace_s=1.0)
    sched.start()
    try:
        for iteration in range(600):
            point = POINTS[iteration % len(POINTS)]
            target_token = rng.randrange(1, 4)
            job, reporter = make_job(f"s{seed}-{iteration}")
            fired: list[str] = []
            if point == "on_started":  # the scheduler has taken the job; generate is not called yet
                reporter.on_started = lambda job=job, fired=fired: fired.append(sched.abort(job.id))

            def fire(job: Job = job, fired: list[str] = fired) -> None:
                fired.append(sched.abort(job.id))

            runtime.before_run = (lambda run: fire()) if point == "before_run" else (lambda run: None)
            if point == "before_first_token":
                runtime.before_token = lambda run, index: fire() if index == 0 else None
            elif point == "mid_stream":
                runtime.before_token = lambda run, index, t=target_token: fire() if index == t else None
            else:
                runtime.before_token = lambda run, index: None
            if point == "queued":
                blocker, blocker_reporter = make_job(f"b{seed}-{iteration}")
                hold = threading.Event()
                release = threading.Event()

                def hold_run(run: FakeRun, hold: threading.Event = hold, release: threading.Event = release) -> None:
                    hold.set()
                    assert release.wait(WAIT_S)

                runtime.before_run = hold_run
                submit(sched, blocker)
                assert hold.wait(WAIT_S)
                runtime.before_run = lambda run: None
                submit(sched, job)
                fire()
                release.set()
                assert blocker_reporter.wait().error_code is None
            else:
                submit(sched, job)
            result = reporter.wait()
            if point == "after_finish":
                fire()
                assert fired == ["not_found"]
                assert result.error_code is None and result.text == "t0t1t2t3"
            else:
                assert fired in (["running"], ["queued"]), (point, fired)
                assert result.error_code == "aborted", (iteration, point, result)
                assert result.finish_reason == "abort"
            assert reporter.kinds.count("finished") == 1
            assert reporter.kinds[0] == "queued"
    finally:
        sched.shutdown(grace_s=WAIT_S)
    assert runtime.max_active == 1


def test_an_abort_racing_a_free_running_job_is_never_lost() -> None:
    """An aborting thread races the runner over 500 jobs: an abort the scheduler accepted before the runtime
    decided the outcome always ends the job ``aborted``."""
    runtime = FakeRuntime(tokens=["x"] * 8, free=True)
    sched = Scheduler(runtime, queue_size=4, hang_grace_s=1.0)
    sched.start()
    outcomes: dict[str, int] = {}
    try:
        for iteration in range(500):
            job, reporter = make_job(f"race-{iteration}")
            go = threading.Barrier(2)
            fired: list[str] = []

            def aborter(job: Job = job, go: threading.Barrier = go, fired: list[str] = fired) -> None:
                go.wait(WAIT_S)
                fired.append(sched.abort(job.id))

            thread = threading.Thread(target=aborter)
            thread.start()
            submit(sched, job)
            go.wait(WAIT_S)
            thread.join(WAIT_S)
            result = reporter.wait()
            assert reporter.kinds.count("finished") == 1
            run = runtime.runs[-1] if runtime.runs and runtime.runs[-1].request is job.request else None
            decided_first = run is not None and run.decided
            if fired == ["queued"] or (fired == ["running"] and not decided_first):
                assert result.error_code == "aborted", (iteration, fired, result)
            else:
                assert result.error_code is None, (iteration, fired, result)
            key = f"{fired[0]}/{result.error_code}"
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        sched.shutdown(grace_s=WAIT_S)
    assert sum(outcomes.values()) == 500
