"""One job at a time: a FIFO queue and the worker thread that runs each job (a generation, a model switch).

A job waits in arrival order; a job still waiting can be withdrawn (its client went away) and nothing else changes.
The running job's RunControl is what /interrupt, /skip and /progress reach, as A1111's shared.state is."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable

from sd_onnx.runtime.control import RunControl


class Job:
    """`work(control)` runs on the worker thread; its result (or exception) settles `future` on the event loop."""

    def __init__(self, name: str, work: Callable[[RunControl], Any], loop: asyncio.AbstractEventLoop):
        self.name, self.work, self.loop = name, work, loop
        self.future: asyncio.Future = loop.create_future()
        self.control = RunControl()
        self.state = "queued"  # queued -> running -> done, or queued -> withdrawn
        self.arrival = 0
        self.started = 0  # the worker's run number, 0 until it runs
        self.time_start = 0.0

    def record(self) -> dict:
        return {"job": self.name, "arrival": self.arrival, "run": self.started,
                "interrupted": self.control.interrupted}


class Worker:
    def __init__(self) -> None:
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._arrivals = itertools.count(1)
        self._runs = itertools.count(1)
        self.current: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sd-onnx-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            job.arrival = next(self._arrivals)
            self._queue.append(job)
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job that has not started out of the queue; False when it already runs or ran."""
        with self._cond:
            if job.state != "queued" or job not in self._queue:
                return False
            self._queue.remove(job)
            job.state = "withdrawn"
            return True

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.current is not None:
            self.current.control.interrupt()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.state, job.started, job.time_start = "running", next(self._runs), time.time()
                self.current = job
            result, error = None, None
            try:
                result = job.work(job.control)
            except BaseException as e:  # noqa: BLE001 - handed to the request, the worker goes on
                error = e
            finally:
                with self._cond:
                    self.current = None
                    job.state = "done"
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the event loop has closed (shutdown)
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
