"""The sampling queue: one worker thread runs jobs in order; the event loop only watches.

Owns ``Job`` (state, queue position, step / total, the latest x̂0 preview, result or error),
``JobQueue`` (bounded; ``submit`` / ``cancel`` / ``get``; one daemon worker thread, so the
server's event loop never samples) and ``Hub`` (wakes the loop's watchers from the worker
thread: ``loop.call_soon_threadsafe``).  A job's work is a function ``work(job)`` that calls
``job.step(...)`` from its sampler callback; ``job.step`` raises ``Cancelled`` once the job
is cancelled, which ends the sampling between two steps.  Knows nothing of HTTP or models.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Cancelled", "Hub", "Job", "JobQueue", "QueueFull"]

STATES = ("queued", "running", "done", "error", "cancelled")
FINAL = frozenset({"done", "error", "cancelled"})


class Cancelled(Exception):
    """Raised inside the worker when the job it runs was cancelled."""


class QueueFull(Exception):
    """The queue holds its maximum number of waiting jobs."""


class Hub:
    """Wakes asyncio watchers from any thread: ``notify()``; watchers ``await wait(timeout)``."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._event = asyncio.Event()

    def _fire(self) -> None:
        old, self._event = self._event, asyncio.Event()
        if old is not None:
            old.set()

    def notify(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop closed meanwhile
                pass

    async def wait(self, timeout: float) -> None:
        """Return at the next ``notify`` or after ``timeout`` seconds."""
        if self._event is None:
            self.attach(asyncio.get_running_loop())
        assert self._event is not None
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class Job:
    """One unit of work and what watchers may read of it (plain attributes, one writer)."""

    def __init__(self, kind: str, payload: dict[str, Any], total: int) -> None:
        self.id = secrets.token_hex(8)
        self.kind = kind
        self.payload = payload
        self.state = "queued"
        self.position = 0  # jobs ahead of it while queued (0 = next)
        self.step_done = 0
        self.total = max(int(total), 1)
        self.preview: bytes | None = None  # PNG of the latest x̂0
        self.preview_step = -1
        self.result: Any = None
        self.error: str | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.version = 0  # bumped on every change a watcher should send
        self._cancel = threading.Event()
        self._hub: Hub | None = None
        self._last_notify = 0.0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _changed(self, force: bool = True) -> None:
        self.version += 1
        now = time.perf_counter()
        if self._hub is not None and (force or now - self._last_notify > 0.1):
            self._last_notify = now
            self._hub.notify()

    def step(self, done: int, preview: Callable[[], bytes] | None = None) -> None:
        """Record ``done`` finished steps (and, at most every 0.2 s or at the end, a preview
        made by ``preview()``); raises ``Cancelled`` when the job was cancelled."""
        if self._cancel.is_set():
            raise Cancelled
        self.step_done = min(int(done), self.total)
        last = self.step_done >= self.total
        if preview is not None and (last or time.perf_counter() - self._preview_time > 0.2):
            self.preview, self.preview_step = preview(), self.step_done
            self._preview_time = time.perf_counter()
        self._changed(force=last or self.step_done == 1)

    _preview_time = 0.0

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /api/jobs/ID`` answers (JSON)."""
        state = self.state  # one reading: the worker thread may change it meanwhile
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": state,
                               "step": self.step_done, "total": self.total}  # fmt: skip
        if state == "queued":
            out["position"] = self.position
        if self.error is not None:
            out["error"] = self.error
        if state == "done" and isinstance(self.result, dict):
            out.update(self.result.get("public", {}))
        return out


class JobQueue:
    """Jobs run one at a time, in order, on a worker thread; at most ``max_waiting`` wait.

    :param work: ``work(job)`` does the job and returns its result (``job.result``); an
        exception marks it ``error`` with the exception's message (``Cancelled``: cancelled).
    :param keep: finished jobs remembered for ``get`` (oldest forgotten first).
    """

    def __init__(
        self, work: Callable[[Job], Any], hub: Hub, *, max_waiting: int = 16, keep: int = 256
    ) -> None:
        self.work = work
        self.hub = hub
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._keep = keep
        self._cond = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self._count = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="difflab-sampler", daemon=True)
        self._thread.start()

    def submit(self, kind: str, payload: dict[str, Any], total: int) -> Job:
        """Queue a job; ``QueueFull`` when ``max_waiting`` jobs already wait."""
        job = Job(kind, payload, total)
        job._hub = self.hub
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} jobs are waiting (the most this server queues)"
                )
            self._waiting.append(job)
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep + self.max_waiting:
                oldest = next(iter(self._jobs.values()))
                if oldest.state not in FINAL:
                    break
                self._jobs.popitem(last=False)
            self._renumber()
            self._cond.notify_all()
        self.hub.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a waiting job at once, or a running one at its next step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job._cancel.set()
            if job.state == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled")
                self._renumber()
        self.hub.notify()
        return job

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                job._cancel.set()
                self._finish(job, "cancelled")
            self._waiting.clear()
            if self.running is not None:
                self.running._cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _renumber(self) -> None:
        for i, job in enumerate(self._waiting):
            if job.position != i:
                job.position = i
                job._changed()

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job._changed()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._renumber()
                job.state, job.started = "running", time.time()
                self.running = job
            job._changed()
            try:
                result = self.work(job)
            except Cancelled:
                self._finish(job, "cancelled")
            except Exception as err:  # noqa: BLE001 - shown to the user; the worker lives on
                self._finish(job, "error", str(err) or type(err).__name__)
            else:
                job.result = result
                job.step_done = job.total
                self._finish(job, "done")
            finally:
                with self._cond:
                    self.running = None
