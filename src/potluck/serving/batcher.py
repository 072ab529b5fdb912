"""The micro-batcher: concurrent requests for one model are gathered into one model run.

A request's texts are tokenized, then queued. When a model worker is free, a collector task takes the
first waiting request and adds more until the batch holds its *fair share* — the texts in the server
(running, waiting, and its own) over the workers — or `max_batch_texts` texts or `max_batch_tokens`
padded tokens; below its share it waits at most `max_wait_ms` for arrivals. The whole batch goes to
`run`, a coroutine that waits for a model process (or a model thread, see `in_thread`), so the event
loop never waits on the model. Each request gets its own rows back; up to `max_in_flight` batches run
at once, one per worker.

Why a fair share: clients that were answered together come back together. Taking whatever is queued
when a worker frees (measured here, 32 one-text clients, 2 workers) ran batches of 1, 4, 14 and 28
texts by turns — a lone text costs a worker as much as several — and waiting a fixed time instead drew
all 32 clients into one batch while the other worker idled (0.6x the throughput). Sharing the texts in
the server evenly between the workers settled at batches of 16 and 16, 1.1x the throughput of taking
what is queued; a lone request on an idle server has a share of one and runs at once. (Written here
because no library in our stack batches across requests; the idea is the dynamic batcher of Triton
and text-embeddings-inference.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future
    longest: int = field(init=False)

    def __post_init__(self):
        self.longest = max(len(row) for row in self.ids)


Run = Callable[[Sequence[Sequence[int]]], Awaitable[np.ndarray]]


def in_thread(fn: Callable[[Sequence[Sequence[int]]], np.ndarray], executor: Executor) -> Run:
    """`fn(ids) -> logits (N, C)` as a coroutine that runs it on `executor`'s threads."""
    async def run(ids: Sequence[Sequence[int]]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, ids)
    return run


class MicroBatcher:
    """Batches the requests of one model. `await run(ids)` gives the logits (N, C) of a batch."""

    def __init__(self, run: Run, *, max_wait_ms: float = 3.0, max_batch_texts: int = 64,
                 max_batch_tokens: int = 8192, max_in_flight: int = 1,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self.run = run
        self.max_wait_ms = max_wait_ms
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens
        self.max_in_flight = max_in_flight
        self.on_batch = on_batch  # called with (texts, padded tokens, seconds) after each model run
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Job | None = None
        self._running: dict[asyncio.Task, int] = {}  # batches running, with their texts
        self._waiting = 0  # texts queued (or carried over) and not yet in a batch
        self._slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="potluck-batcher")

    @property
    def pending(self) -> int:
        """Requests waiting, and batches running (for /metrics and a graceful stop)."""
        queued = self._queue.qsize() if self._queue else 0
        return queued + (self._carry is not None) + len(self._running)

    async def submit(self, ids: list[list[int]]) -> np.ndarray:
        """Queue token ids of one request; returns their logits (len(ids), C) in the same order."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if not ids:
            raise ValueError("no texts to run")
        job = _Job(ids, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        self._waiting += len(ids)
        return await job.future

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the requests already queued (for at most `timeout` seconds), then stop collecting."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()  # a model worker is free: gather the next batch for it
            try:
                jobs, texts = await self._gather()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._running[task] = texts
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self._slots.release()

    def _share(self, texts: int) -> int:
        """A batch's fair share: the texts in the server (running, waiting, and this batch's) over the workers."""
        return -(-(sum(self._running.values()) + self._waiting + texts) // self.max_in_flight)

    async def _gather(self) -> tuple[list[_Job], int]:
        """The next batch and its texts: the first waiting job, then more until the batch holds its
        fair share or the budget is full; below its share it waits at most max_wait_ms for arrivals."""
        job = self._carry or await self._queue.get()
        self._carry = None
        jobs, texts, longest = [], 0, 0
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while True:
            wider = max(longest, job.longest)
            grown = texts + len(job.ids)
            if jobs and (grown > self.max_batch_texts or grown * wider > self.max_batch_tokens):
                self._carry = job  # it opens the next batch
                break
            jobs.append(job)
            texts, longest, self._waiting = grown, wider, self._waiting - len(job.ids)
            if texts >= min(self._share(texts), self.max_batch_texts):
                break
            if not self._queue.empty():
                job = self._queue.get_nowait()
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                job = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
        return jobs, texts

    async def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # a cancelled request needs no answer
        if not jobs:
            return
        ids = [row for job in jobs for row in job.ids]
        started = time.perf_counter()
        try:
            logits = await self.run(ids)  # (N, C)
        except Exception as err:  # the model failed: every request of the batch gets the error
            logger.exception("model run failed for a batch of %d texts", len(ids))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        if self.on_batch is not None:
            self.on_batch(len(ids), len(ids) * max(len(row) for row in ids), time.perf_counter() - started)
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(logits[start:start + len(job.ids)])
            start += len(job.ids)
