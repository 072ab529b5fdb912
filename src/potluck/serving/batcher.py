"""The micro-batcher: concurrent requests for one model are gathered into one model run.

A request's texts are tokenized on a tokenizer thread, then queued. A collector task takes the first
waiting request, lets others join for at most `max_wait_ms` (or until the batch holds `max_batch_texts`
texts or `max_batch_tokens` padded tokens), and hands the whole batch to `run`, a coroutine that waits
for a model process (or a model thread, see `in_thread`), so the event loop never waits on the model.
Each request gets its own rows back. Up to `max_in_flight` batches run at once (one per model process
or thread); while they run, the next one fills up, so a busy server runs large batches and an idle one
answers a lone request after at most `max_wait_ms`. (Written here
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
        self._running: set[asyncio.Task] = set()
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
            await self._slots.acquire()  # a model thread is free: gather the next batch for it
            try:
                jobs = await self._gather()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _gather(self) -> list[_Job]:
        """The first waiting job plus whatever joins within max_wait_ms and fits the budget."""
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs, texts, longest = [first], len(first.ids), first.longest
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while texts < self.max_batch_texts:
            try:
                timeout = deadline - time.monotonic()
                job = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            wider = max(longest, job.longest)
            if texts + len(job.ids) > self.max_batch_texts or (texts + len(job.ids)) * wider > self.max_batch_tokens:
                self._carry = job  # it opens the next batch
                break
            jobs.append(job)
            texts, longest = texts + len(job.ids), wider
        return jobs

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
