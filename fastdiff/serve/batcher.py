"""The request scheduler of the HTTP server: a queue of jobs, batched by key, run one batch at a time.

It knows nothing of HTTP or diffusion. A job is (key, size, payload): jobs with equal keys can share one runner
call (for images: the same model, image size, steps, sampler...), `size` is what the job adds to a batch (its
images) and `payload` goes to the runner untouched. The runner does the work of a list of payloads in one call.

One worker thread runs one batch at a time (the GPU is one device). It takes the oldest queued job, then, in queue
order, every other queued job with an equal key that still fits in `max_batch` (a job bigger than `max_batch` runs
alone). It never waits for more jobs to arrive: whatever queued while the previous batch ran is batched.

A batch whose runner call raises is run again job by job, so only the jobs that fail alone get the exception.
`Interrupted` is the exception: a runner is expected to catch it and return the images made so far (as AUTOMATIC1111
answers an interrupted request); if it escapes the runner, every job of the batch gets it.

A job that waits longer than `queue_timeout_s` is never started: its future gets TimeoutError. The worker checks
when it picks jobs, and a timer thread, asleep until the oldest queued job's deadline, answers while the worker is
busy with a long batch.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Optional

MIN_RETRY_AFTER_S = 1.0  # HTTP's Retry-After counts whole seconds: never ask a client to come back at once
SHUTTING_DOWN = "server shutting down"


class QueueFull(Exception):
    """The queue holds max_queue jobs already (an HTTP server answers 503 with Retry-After)."""

    def __init__(self, max_queue: int, retry_after_s: float) -> None:
        super().__init__(f"the queue holds {max_queue} jobs already; retry in about {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s  # an estimate: when the running batch ends and frees queue places


class Interrupted(Exception):
    """Raised inside a runner by Progress.update when an interrupt was asked for."""


class Progress:
    """What a runner reports while it works, and how it learns that it should stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._step = 0
        self._steps = 0
        self._interrupted = False

    def update(self, step: int, steps: int) -> None:
        """Record that the running batch is at `step` of `steps`; raise Interrupted if an interrupt was asked for."""
        with self._lock:
            self._step, self._steps = step, steps
            if self._interrupted:
                raise Interrupted(f"interrupted at step {step} of {steps}")

    def _interrupt(self) -> None:
        with self._lock:
            self._interrupted = True

    def _read(self) -> tuple[int, int, bool, float, float]:
        """(step, steps, interrupted, fraction done in [0, 1], seconds since the runner call started)."""
        with self._lock:
            fraction = min(1.0, max(0.0, self._step / self._steps)) if self._steps > 0 else 0.0
            return self._step, self._steps, self._interrupted, fraction, time.monotonic() - self._started


Runner = Callable[[list[Any], Progress], list[Any]]  # payloads -> one result per payload, in order


@dataclass
class BatcherStats:
    """What the worker has done: jobs it ran to a result or an error, batches, and their sizes in jobs."""

    jobs_done: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size in jobs -> batches of that size
    busy_s: float = 0.0  # seconds spent running batches


@dataclass(eq=False)
class _Job:
    key: Hashable
    size: int
    payload: Any
    future: Future
    deadline: float  # time.monotonic() after which the job must not start


@dataclass
class _Outcome:
    job: _Job
    result: Any = None
    error: Optional[BaseException] = None


class Batcher:
    """Runs submitted jobs through `runner` in batches of jobs with equal keys, one batch at a time."""

    def __init__(self, runner: Runner, *, max_queue: int = 64, max_batch: int = 8,
                 queue_timeout_s: float = 600.0) -> None:
        for name, value in (("max_queue", max_queue), ("max_batch", max_batch)):
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {queue_timeout_s!r}")
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.queue_timeout_s = float(queue_timeout_s)
        self._runner = runner
        self._cond = threading.Condition()  # guards everything below; notified when the queue grows or on close
        self._queue: list[_Job] = []  # oldest first, so the first job also has the earliest deadline
        self._running: list[_Job] = []  # the batch being run, empty when idle
        self._progress: Optional[Progress] = None  # that of the runner call in progress
        self._batch_started = 0.0
        self._job_no = 0
        self._job_timestamp = "0"  # as AUTOMATIC1111 before its first job
        self._closed = False
        self._stats = BatcherStats()
        self._worker = threading.Thread(target=self._work, name="fastdiff-batcher", daemon=True)
        self._timer = threading.Thread(target=self._expire_on_time, name="fastdiff-batcher-timeouts", daemon=True)
        self._worker.start()
        self._timer.start()

    def submit(self, key: Hashable, size: int, payload: Any) -> Future:
        """Queue a job; its future gets the runner's result for `payload`, or the error that stopped it."""
        if not _is_positive_int(size):
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        future: Future = Future()
        future.add_done_callback(self._drop_cancelled)
        with self._cond:
            if self._closed:
                raise RuntimeError(SHUTTING_DOWN)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.max_queue, max(MIN_RETRY_AFTER_S, self._eta_locked()))
            self._queue.append(_Job(key, size, payload, future, time.monotonic() + self.queue_timeout_s))
            self._cond.notify_all()
        return future

    def interrupt(self) -> None:
        """Stop the runner call running now: it sees Interrupted at its next Progress.update. Queued jobs are
        untouched, and so is a runner call that starts later."""
        with self._cond:
            if self._progress is not None:
                self._progress._interrupt()

    def state(self) -> dict:
        """The running batch's progress, in the shape of AUTOMATIC1111's /sdapi/v1/progress answer."""
        with self._cond:
            step, steps, interrupted, fraction = 0, 0, False, 0.0
            if self._progress is not None:
                step, steps, interrupted, fraction, _ = self._progress._read()
            return {
                "progress": fraction,
                "eta_relative": self._eta_locked(),
                "state": {
                    "skipped": False,
                    "interrupted": interrupted,
                    "job": f"batch {self._job_no}" if self._running else "",
                    "job_count": len(self._queue) + len(self._running),
                    "job_timestamp": self._job_timestamp,
                    "job_no": self._job_no,
                    "sampling_step": step,
                    "sampling_steps": steps,
                },
                "current_image": None,
                "textinfo": None,
            }

    @property
    def stats(self) -> BatcherStats:
        """A copy of the counters, consistent at the moment of the call."""
        with self._cond:
            return replace(self._stats, batch_sizes=dict(self._stats.batch_sizes))

    def close(self, wait: bool = True) -> None:
        """Stop accepting jobs and fail the queued ones with RuntimeError; the running batch finishes.
        wait: return only once the worker and timer threads have ended."""
        with self._cond:
            self._closed = True
            queued = self._claim_locked(self._queue)
            self._queue = []
            self._cond.notify_all()
        for job in queued:
            job.future.set_exception(RuntimeError(SHUTTING_DOWN))
        if wait:
            for thread in (self._worker, self._timer):
                if thread is not threading.current_thread():  # a runner or a future's callback may close
                    thread.join()

    # The worker thread.

    def _work(self) -> None:
        """Pick a batch, run it, resolve its futures; until closed."""
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:  # close() has emptied the queue
                    return
                expired = self._take_expired_locked()
                batch = self._take_batch_locked()
                if batch:
                    self._running = batch
                    self._batch_started = time.monotonic()
                    self._job_no += 1
                    self._job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self._fail_expired(expired)
            if batch:
                self._run(batch)

    def _take_batch_locked(self) -> list[_Job]:
        """Remove and claim the oldest job and the later jobs of its key that fit beside it in max_batch."""
        while self._queue:
            first = self._queue.pop(0)
            if first.future.set_running_or_notify_cancel():
                break
        else:
            return []
        batch, rest, total = [first], [], first.size
        for job in self._queue:
            if job.key == first.key and total + job.size <= self.max_batch:
                if job.future.set_running_or_notify_cancel():  # False: cancelled a moment ago, dropped
                    batch.append(job)
                    total += job.size
            else:
                rest.append(job)
        self._queue = rest
        return batch

    def _run(self, batch: list[_Job]) -> None:
        """Run a batch, then record it as done before its futures resolve, so that a client holding a result sees
        state() and stats without that batch."""
        outcomes = self._execute(batch)
        with self._cond:
            self._stats.busy_s += time.monotonic() - self._batch_started
            self._stats.batches += 1
            self._stats.batch_sizes[len(batch)] = self._stats.batch_sizes.get(len(batch), 0) + 1
            self._stats.jobs_done += len(batch)
            self._running = []
            self._progress = None
        for outcome in outcomes:
            if outcome.error is None:
                outcome.job.future.set_result(outcome.result)
            else:
                outcome.job.future.set_exception(outcome.error)

    def _execute(self, jobs: list[_Job]) -> list[_Outcome]:
        """One runner call for `jobs`; if it raises (but for Interrupted) and holds several, one call per job."""
        try:
            results = self._call_runner([job.payload for job in jobs])
        except Exception as error:
            if len(jobs) == 1 or isinstance(error, Interrupted):
                return [_Outcome(job, error=error) for job in jobs]
            return [outcome for job in jobs for outcome in self._execute([job])]
        return [_Outcome(job, result=result) for job, result in zip(jobs, results)]

    def _call_runner(self, payloads: list[Any]) -> list[Any]:
        progress = Progress()
        with self._cond:
            self._progress = progress
        results = list(self._runner(payloads, progress))
        if len(results) != len(payloads):
            raise ValueError(f"the runner returned {len(results)} results for {len(payloads)} payloads")
        return results

    # Queue timeouts and cancellations.

    def _expire_on_time(self) -> None:
        """The timer thread: fail queued jobs at their deadline, even while the worker is busy."""
        while True:
            with self._cond:
                if self._closed:
                    return
                expired = self._take_expired_locked()
                if not expired:
                    self._cond.wait(self._queue[0].deadline - time.monotonic() if self._queue else None)
                    continue
            self._fail_expired(expired)

    def _take_expired_locked(self) -> list[_Job]:
        """Remove and claim the queued jobs past their deadline."""
        now = time.monotonic()
        expired = [job for job in self._queue if job.deadline <= now]
        if expired:
            self._queue = [job for job in self._queue if job.deadline > now]
        return self._claim_locked(expired)

    def _fail_expired(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.future.set_exception(TimeoutError(f"the job waited in the queue longer than "
                                                  f"{self.queue_timeout_s:g} s and was not started"))

    @staticmethod
    def _claim_locked(jobs: list[_Job]) -> list[_Job]:
        """The jobs whose futures were not cancelled, now marked running: from here only the batcher resolves
        them, and a client can no longer cancel them."""
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _drop_cancelled(self, future: Future) -> None:
        """A future's done callback: a job cancelled by its client leaves the queue (and frees its place)."""
        if future.cancelled():
            with self._cond:
                self._queue = [job for job in self._queue if job.future is not future]

    def _eta_locked(self) -> float:
        """Seconds until the running batch ends: from its progress, else from the mean batch time; 0 when idle."""
        if not self._running:
            return 0.0
        if self._progress is not None:
            _, _, _, fraction, elapsed = self._progress._read()
            if fraction > 0:
                return elapsed / fraction - elapsed
        if self._stats.batches:
            mean = self._stats.busy_s / self._stats.batches
            return max(0.0, mean - (time.monotonic() - self._batch_started))
        return 0.0


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
