"""The bounded job queue of ``safelatent serve``: ``workers`` threads, each with its own pipeline.

A :class:`~safelatent.api.Pipeline` holds per-request state (the active LoRA set), so each worker owns
one and runs one job at a time; ``concurrency`` pipelines share the process. At most ``capacity`` jobs
are queued or running: :meth:`JobQueue.submit` refuses more with :class:`QueueFull` (HTTP 429 with a
``Retry-After`` estimated from recent job times). Finished jobs are kept for ``keep_seconds`` (and at
most ``keep_jobs`` of them) so clients can fetch them by id; then they are dropped, so memory stays
bounded however long the server runs.
"""

from __future__ import annotations

import collections
import itertools
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["Job", "JobQueue", "QueueFull"]


class QueueFull(Exception):
    """No room for another job; ``retry_after``: seconds until one is likely to be free."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the job queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One request's work. ``run(pipeline)`` returns the result dict or raises; ``future`` completes once
    with it (also when the job fails)."""

    owner: int
    run: Callable[[Any], dict[str, Any]]
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    status: str = "queued"
    created: str = field(default_factory=_now)
    finished: str | None = None
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    future: Future = field(default_factory=Future)
    finished_at: float = 0.0


class JobQueue:
    """``len(pipelines)`` worker threads; ``capacity`` jobs at most waiting or running."""

    def __init__(
        self,
        pipelines: list[Any],
        capacity: int,
        *,
        keep_seconds: float = 600.0,
        keep_jobs: int = 1000,
    ) -> None:
        if not pipelines:
            raise ValueError("the job queue needs at least one pipeline")
        self.capacity = max(capacity, len(pipelines))
        self.workers = len(pipelines)
        self.keep_seconds, self.keep_jobs = keep_seconds, keep_jobs
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._active = 0  # queued + running
        self._running = 0
        self._completed = itertools.count()
        self.completed = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(pipe,), name=f"safelatent-worker-{i}", daemon=True)
            for i, pipe in enumerate(pipelines)
        ]
        for thread in self._threads:
            thread.start()

    # ---- clients ---------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._expire()
            if self._active >= self.capacity:
                raise QueueFull(self._retry_after())
            self._active += 1
            self._jobs[job.id] = job
        self._pending.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "queued": self._active - self._running,
                "running": self._running,
                "capacity": self.capacity,
                "workers": self.workers,
                "completed": self.completed,
            }

    def close(self) -> None:
        """Stop the workers after the jobs already queued."""
        for _ in self._threads:
            self._pending.put(None)
        for thread in self._threads:
            thread.join()

    # ---- workers ---------------------------------------------------------------------------------------

    def _work(self, pipeline: Any) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                self._running += 1
                job.status = "running"
            started = time.monotonic()
            try:
                job.result = job.run(pipeline)
                job.status = "done"
            except BaseException as error:  # the job fails; the worker goes on
                # without its traceback: its frames would keep the job's tensors (maybe on the GPU) alive
                # for as long as the job is kept
                job.error = error.with_traceback(None)
                job.status = "failed"
            with self._lock:
                self._running -= 1
                self._active -= 1
                self.completed = next(self._completed) + 1
                self._durations.append(time.monotonic() - started)
                job.finished, job.finished_at = _now(), time.monotonic()
                self._finished.append(job.id)
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.result)

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue's length × the recent mean job time / workers."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1.0, (self._active - self.workers + 1) * mean / self.workers)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._finished:
            job = self._jobs.get(self._finished[0])
            if (
                job is not None
                and now - job.finished_at < self.keep_seconds
                and (len(self._finished) <= self.keep_jobs)
            ):
                break
            self._finished.popleft()
            self._jobs.pop(job.id if job else "", None)
