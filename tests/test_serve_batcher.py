"""The request scheduler, with fake runners: batching, queue limits and timeouts, failures, interrupts, progress.

The fake runners hold the worker busy on a threading.Event, so that what queues meanwhile is known exactly when the
next batch is picked; no test depends on how fast a thread runs.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from fastdiff.serve.batcher import Batcher, Interrupted, Progress, QueueFull

WAIT_S = 10.0  # generous: only a broken batcher makes a test wait this long
HOLD = "hold"  # FakeRunner blocks on this payload until released
BAD = "bad"  # FakeRunner raises on any call with this payload


class FakeRunner:
    """Answers ("done", payload) per payload and records each call's payloads. A call with HOLD blocks until
    release(); a call with BAD raises ValueError."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.holding = threading.Event()
        self._released = threading.Event()

    def __call__(self, payloads: list[Any], progress: Progress) -> list[Any]:
        self.calls.append(list(payloads))
        if HOLD in payloads:
            self.holding.set()
            assert self._released.wait(WAIT_S)
        if BAD in payloads:
            raise ValueError(f"cannot make {BAD!r}")
        return [("done", payload) for payload in payloads]

    def release(self) -> None:
        """Let the HOLD call go on."""
        self._released.set()

    def release_all(self) -> None:
        """Let every call go on (the fixture calls it at the end of each test)."""
        self.release()


class StepRunner(FakeRunner):
    """A HOLD call blocks as FakeRunner's. Any other call steps through `steps` steps, reporting each to progress;
    one with "pause" stops after step `pause_at` until resume() (paused is set meanwhile). It catches Interrupted
    and answers ("partial", steps done) per payload, unless `catch` is False; else ("done", steps)."""

    def __init__(self, steps: int = 10, pause_at: int = 3, catch: bool = True) -> None:
        super().__init__()
        self.steps, self.pause_at, self.catch = steps, pause_at, catch
        self.paused = threading.Event()
        self._resumed = threading.Event()

    def __call__(self, payloads: list[Any], progress: Progress) -> list[Any]:
        if HOLD in payloads:
            return super().__call__(payloads, progress)
        self.calls.append(list(payloads))
        done = 0
        try:
            for step in range(1, self.steps + 1):
                progress.update(step, self.steps)
                done = step
                if step == self.pause_at and "pause" in payloads:
                    self.paused.set()
                    assert self._resumed.wait(WAIT_S)
        except Interrupted:
            if not self.catch:
                raise
            return [("partial", done)] * len(payloads)
        return [("done", done)] * len(payloads)

    def resume(self) -> None:
        """Let the "pause" call go on."""
        self._resumed.set()

    def release_all(self) -> None:
        self.release()
        self.resume()


@pytest.fixture
def make_batcher():
    """Batcher(runner, **options), with every runner released and every batcher closed at the end of the test."""
    made: list[tuple[FakeRunner, Batcher]] = []

    def make(runner: FakeRunner, **options: Any) -> Batcher:
        batcher = Batcher(runner, **options)
        made.append((runner, batcher))
        return batcher

    yield make
    for runner, batcher in made:
        runner.release_all()
        batcher.close()


def hold(batcher: Batcher, runner: FakeRunner) -> Future:
    """Occupy the worker with a HOLD job; return its future once the runner is blocked in it."""
    future = batcher.submit("hold", 1, HOLD)
    assert runner.holding.wait(WAIT_S)
    return future


def results(futures: list[Future]) -> list[Any]:
    return [future.result(WAIT_S) for future in futures]


def error_of(future: Future) -> BaseException:
    error = future.exception(WAIT_S)
    assert error is not None, f"expected an error, got {future.result()!r}"
    return error


def test_compatible_jobs_queued_while_busy_run_as_one_batch_in_queue_order(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner)
    held = hold(batcher, runner)
    jobs = [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3"), ("b", "b2")]
    futures = [batcher.submit(key, 1, payload) for key, payload in jobs]
    runner.release()
    assert results(futures) == [("done", payload) for _, payload in jobs]
    assert held.result(WAIT_S) == ("done", HOLD)
    assert runner.calls == [[HOLD], ["a1", "a2", "a3"], ["b1", "b2"]]


def test_max_batch_respected_and_oversized_job_runs_alone(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch=4)
    hold(batcher, runner)
    sizes = {"x1": 2, "x2": 2, "x3": 1, "big": 9, "x4": 1, "x5": 3}
    futures = [batcher.submit("a", size, payload) for payload, size in sizes.items()]
    runner.release()
    assert results(futures) == [("done", payload) for payload in sizes]
    # x3 does not fit beside x1 and x2 and is the oldest job next time; a job bigger than max_batch runs alone.
    assert runner.calls == [[HOLD], ["x1", "x2"], ["x3", "x4"], ["big"], ["x5"]]
    stats = batcher.stats
    assert (stats.jobs_done, stats.batches, stats.batch_sizes) == (7, 5, {1: 3, 2: 2})


def test_jobs_from_many_threads_each_get_their_own_result(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch=8)
    hold(batcher, runner)
    keys = ("k0", "k1", "k2")
    start = threading.Barrier(8)

    def submit_six(thread: int) -> list[tuple[Any, Future]]:
        start.wait(WAIT_S)
        payloads = [(keys[(thread + i) % 3], thread, i) for i in range(6)]
        return [(payload, batcher.submit(payload[0], 1, payload)) for payload in payloads]

    with ThreadPoolExecutor(8) as pool:
        submitted = [job for jobs in pool.map(submit_six, range(8)) for job in jobs]
    runner.release()
    assert len(submitted) == 48
    for payload, future in submitted:
        assert future.result(WAIT_S) == ("done", payload)
    batches = runner.calls[1:]
    ran = [payload for batch in batches for payload in batch]
    assert sorted(ran) == sorted(payload for payload, _ in submitted)  # none lost, none run twice
    for batch in batches:
        assert len({key for key, _, _ in batch}) == 1 and len(batch) <= 8
    assert max(len(batch) for batch in batches) > 1


def test_queue_full_when_max_queue_jobs_wait_then_submit_works_after_drain(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue=2)
    hold(batcher, runner)  # running: does not count
    queued = [batcher.submit("a", 1, "q1"), batcher.submit("b", 1, "q2")]
    with pytest.raises(QueueFull) as full:
        batcher.submit("a", 1, "q3")
    assert full.value.retry_after_s > 0
    runner.release()
    assert results(queued) == [("done", "q1"), ("done", "q2")]
    assert batcher.submit("a", 1, "q3").result(WAIT_S) == ("done", "q3")


def test_submit_rejects_a_size_below_one(make_batcher):
    batcher = make_batcher(FakeRunner())
    for size in (0, -1):
        with pytest.raises(ValueError, match="size"):
            batcher.submit("a", size, "x")


def test_queue_timeout_fails_a_job_that_cannot_start_and_others_still_run(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner, queue_timeout_s=1.0)  # long enough for the idle worker to pick HOLD at once
    held = hold(batcher, runner)
    late = batcher.submit("a", 1, "late")
    # Answered while the worker is still busy: the timer does not wait for the worker.
    error = error_of(late)
    assert isinstance(error, TimeoutError) and "queue" in str(error)
    assert batcher.state()["state"]["job_count"] == 1
    runner.release()
    assert held.result(WAIT_S) == ("done", HOLD)
    assert batcher.submit("a", 1, "next").result(WAIT_S) == ("done", "next")
    assert "late" not in [payload for batch in runner.calls for payload in batch]


def test_failing_payload_fails_only_its_own_job(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner)
    hold(batcher, runner)
    futures = [batcher.submit("a", 1, payload) for payload in ("ok1", BAD, "ok2")]
    runner.release()
    assert futures[0].result(WAIT_S) == ("done", "ok1")
    assert futures[2].result(WAIT_S) == ("done", "ok2")
    assert isinstance(error_of(futures[1]), ValueError)
    assert runner.calls[1:] == [["ok1", BAD, "ok2"], ["ok1"], [BAD], ["ok2"]]


def test_interrupt_returns_the_runners_partial_results_and_spares_the_next_batch(make_batcher):
    runner = StepRunner(steps=10, pause_at=3)
    batcher = make_batcher(runner)
    hold(batcher, runner)
    first = [batcher.submit("a", 1, "pause"), batcher.submit("a", 1, "other")]
    runner.release()
    assert runner.paused.wait(WAIT_S)
    batcher.interrupt()
    assert batcher.state()["state"]["interrupted"] is True
    runner.resume()
    assert results(first) == [("partial", 3)] * 2
    assert batcher.submit("a", 1, "next").result(WAIT_S) == ("done", 10)
    assert runner.calls == [[HOLD], ["pause", "other"], ["next"]]


def test_interrupted_escaping_the_runner_reaches_every_job_without_retry(make_batcher):
    runner = StepRunner(steps=10, pause_at=3, catch=False)
    batcher = make_batcher(runner)
    hold(batcher, runner)
    futures = [batcher.submit("a", 1, "pause"), batcher.submit("a", 1, "other")]
    runner.release()
    assert runner.paused.wait(WAIT_S)
    batcher.interrupt()
    runner.resume()
    assert all(isinstance(error_of(future), Interrupted) for future in futures)
    assert runner.calls == [[HOLD], ["pause", "other"]]


def test_interrupt_when_idle_touches_nothing(make_batcher):
    runner = StepRunner()
    batcher = make_batcher(runner)
    batcher.interrupt()
    assert batcher.submit("a", 1, "x").result(WAIT_S) == ("done", 10)


def test_state_reports_the_running_step_and_job_count_then_idle(make_batcher):
    runner = StepRunner(steps=20, pause_at=3)
    batcher = make_batcher(runner)
    idle = batcher.state()
    assert idle["state"]["job_no"] == 0 and idle["progress"] == 0.0
    futures = [batcher.submit("a", 1, "pause")]
    assert runner.paused.wait(WAIT_S)
    futures += [batcher.submit("b", 1, "q1"), batcher.submit("b", 1, "q2")]
    running = batcher.state()
    assert running["progress"] == pytest.approx(3 / 20)
    assert running["eta_relative"] >= 0.0
    assert running["current_image"] is None and running["textinfo"] is None
    state = running["state"]
    assert (state["sampling_step"], state["sampling_steps"]) == (3, 20)
    assert (state["job_count"], state["job_no"], state["job"]) == (3, 1, "batch 1")
    assert (state["skipped"], state["interrupted"]) == (False, False)
    assert re.fullmatch(r"\d{14}", state["job_timestamp"])
    runner.resume()
    assert results(futures) == [("done", 20)] * 3
    after = batcher.state()
    assert (after["progress"], after["eta_relative"]) == (0.0, 0.0)
    state = after["state"]
    assert (state["job"], state["job_count"], state["job_no"]) == ("", 0, 2)
    assert (state["sampling_step"], state["sampling_steps"], state["interrupted"]) == (0, 0, False)


def test_cancelled_queued_future_is_dropped(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue=1)
    hold(batcher, runner)
    cancelled = batcher.submit("a", 1, "cancelled")
    assert cancelled.cancel()
    assert batcher.state()["state"]["job_count"] == 1  # the running job only
    kept = batcher.submit("a", 1, "kept")  # the cancelled job's place is free again
    runner.release()
    assert kept.result(WAIT_S) == ("done", "kept")
    assert runner.calls == [[HOLD], ["kept"]]


def test_close_cancels_queued_jobs_finishes_the_running_batch_and_joins(make_batcher):
    runner = FakeRunner()
    batcher = make_batcher(runner)
    held = hold(batcher, runner)
    queued = batcher.submit("a", 1, "queued")
    closer = threading.Thread(target=batcher.close)
    closer.start()
    error = error_of(queued)
    assert isinstance(error, RuntimeError) and "shutting down" in str(error)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit("a", 1, "too late")
    assert closer.is_alive()  # joining the worker, which still runs the held batch
    runner.release()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert held.result(0) == ("done", HOLD)
    assert runner.calls == [[HOLD]]
