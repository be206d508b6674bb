"""One thread owns the pipeline; requests wait in a bounded queue and compatible ones share a model call.

A batch is the oldest request plus the later ones with the same key (size, recipe, adapters, kind of
edit) while their images fit in `max_batch`; a request with more images than that runs alone, in chunks.
Each image keeps its own prompt and seed. A request cancelled before it starts (client gone, timeout,
shutdown) is taken out of the queue; a running batch stops between steps when no request in it is still
wanted. A batch that fails with NaN/inf is rerun request by request, so one bad request fails alone.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from .errors import ApiError
from .limits import Limits

log = logging.getLogger("flashsd3.serve")
HISTORY = 512  # finished tasks kept for progress queries


class Aborted(Exception):
    """Raised from the step callback: no request of the running batch is still wanted."""


@dataclass(eq=False)
class Task:
    id: str
    spec: object  # spec.Spec
    deadline: float  # time.monotonic() after which the request is answered 408
    state: str = "queued"  # queued, running, done, failed
    step: int = 0
    steps: int = 0
    model_batch: int = 0  # images in the model call that made this request's images
    result: list[bytes] | None = None
    error: ApiError | None = None
    wanted: bool = True  # False once the client is gone or the answer was given
    on_done: object = None  # called (from the worker thread) when the task is finished
    created: float = field(default_factory=time.time)

    def finish(self, result=None, error: ApiError | None = None) -> None:
        self.result, self.error = result, error
        self.state = "done" if error is None else "failed"
        if self.on_done is not None:
            self.on_done()


class Metrics:
    def __init__(self):
        self.images = self.requests = self.failed = self.cancelled = self.rejected = self.batches = 0
        self.step_seconds = 0.0
        self.steps = 0


class Worker:
    def __init__(self, engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._queue: collections.deque[Task] = collections.deque()
        self._running: list[Task] = []
        self._tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._closing = self._abort = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="flashsd3-worker", daemon=True)

    # Called from the event loop ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Task) -> None:
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._queue) >= self.limits.max_queue:
                self.metrics.rejected += 1
                wait = max(1, round(self._batch_seconds * (1 + len(self._queue) / self.limits.max_batch)))
                raise ApiError(429, f"the queue is full ({self.limits.max_queue} requests waiting, --max-queue); "
                               f"retry in about {wait} s", code="queue_full", headers={"Retry-After": str(wait)})
            old = self._tasks.get(task.id)
            if old is not None and old.state in ("queued", "running"):
                raise ApiError(409, f"task id {task.id!r} is already in use by a request in progress",
                               code="task_id_in_use")
            self._queue.append(task)
            self._remember(task)
            self.metrics.requests += 1
            self._cond.notify_all()

    def cancel(self, task: Task, error: ApiError) -> bool:
        """The answer no longer needs this task: drop it if queued (True); a running one is only marked."""
        with self._cond:
            task.wanted = False
            if task.state == "queued" and task in self._queue:
                self._queue.remove(task)
                self.metrics.cancelled += 1
                task.finish(error=error)
                return True
            return False

    def task(self, task_id: str) -> Task | None:
        with self._cond:
            return self._tasks.get(task_id)

    def position(self, task: Task) -> int | None:
        """0 for the next request to run; None if not queued."""
        with self._cond:
            try:
                return self._queue.index(task)
            except ValueError:
                return None

    def status(self) -> dict:
        with self._cond:
            return {"queue_length": len(self._queue), "running": len(self._running), "closing": self._closing,
                    "running_step": self._running[0].step if self._running else 0,
                    "running_steps": self._running[0].steps if self._running else 0}

    def shutdown(self) -> None:
        """Stop accepting; answer every queued request 503; the running batch finishes."""
        with self._cond:
            self._closing = True
            while self._queue:
                task = self._queue.popleft()
                task.finish(error=ApiError(503, "the server is shutting down; this request was not started",
                                           code="shutting_down"))
            self._cond.notify_all()

    def abort(self) -> None:
        """Shutdown, and stop the running batch at its next step."""
        self.shutdown()
        self._abort = True

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # The worker thread ----------------------------------------------------------------------------

    def _remember(self, task: Task) -> None:
        self._tasks[task.id] = task
        self._tasks.move_to_end(task.id)
        while len(self._tasks) > HISTORY:
            oldest_id, oldest = next(iter(self._tasks.items()))
            if oldest.state in ("queued", "running"):
                break
            del self._tasks[oldest_id]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
            if batch:
                self._run(batch)

    def _take(self) -> list[Task]:
        """The oldest request and the compatible ones behind it; expired ones are answered 408 (lock held)."""
        now = time.monotonic()
        for task in [t for t in self._queue if t.deadline <= now]:
            self._queue.remove(task)
            task.finish(error=timeout_error(self.limits))
        if not self._queue:
            return []
        head = self._queue.popleft()
        batch, images = [head], head.spec.n
        for task in list(self._queue):
            if task.spec.key == head.spec.key and images + task.spec.n <= self.limits.max_batch:
                self._queue.remove(task)
                batch.append(task)
                images += task.spec.n
        for task in batch:
            task.state = "running"
        self._running = batch
        return batch

    def _run(self, batch: list[Task]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._generate(batch)
        except FloatingPointError as e:
            if len(batch) > 1:  # find the request that fails; the others get their images
                for task in batch:
                    self._run([task])
                return
            self._fail(batch, ApiError(500, f"generation failed: {e}", code="generation_failed"))
            return
        except Aborted:
            error = ApiError(503, "the server is shutting down" if self._abort else "cancelled", code="cancelled")
            self.metrics.cancelled += sum(t.wanted is False for t in batch)
            self._fail(batch, error)
            return
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the console gets the traceback
            log.error("generation raised:\n%s", traceback.format_exc())
            self._fail(batch, ApiError(500, f"internal error during generation ({type(e).__name__})",
                                       code="internal_error"))
            return
        finally:
            with self._cond:
                self._running = []
        seconds = time.perf_counter() - t0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batches += 1
        for task in batch:
            self.metrics.images += len(results[task.id])
            task.finish(results[task.id])

    def _generate(self, batch: list[Task]) -> dict[str, list[bytes]]:
        items = [(task, k) for task in batch for k in range(task.spec.n)]
        size = min(len(items), self.limits.max_batch)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        steps = batch[0].spec.steps
        for task in batch:
            task.model_batch, task.steps, task.step = size, steps * len(chunks), 0
        out: dict[str, list[bytes]] = {task.id: [] for task in batch}
        for c, chunk in enumerate(chunks):
            callback = self._callback(batch, c * steps)
            pngs = self.engine.run([(task.spec, k) for task, k in chunk], callback)
            for (task, _), png in zip(chunk, pngs, strict=True):
                out[task.id].append(png)
        return out

    def _callback(self, batch: list[Task], done_before: int):
        last = [time.perf_counter()]

        def step(i, x):
            now = time.perf_counter()
            self.metrics.step_seconds += now - last[0]
            self.metrics.steps += 1
            last[0] = now
            for task in batch:
                task.step = done_before + i + 1
            if self._abort or not any(task.wanted for task in batch):
                raise Aborted()
        return step

    def _fail(self, batch: list[Task], error: ApiError) -> None:
        self.metrics.failed += len(batch)
        for task in batch:
            task.finish(error=error)


def timeout_error(limits: Limits) -> ApiError:
    return ApiError(408, f"the request took longer than this server's limit of {limits.timeout:g} s (--timeout)",
                    code="timeout")
