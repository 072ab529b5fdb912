"""Model processes: the server runs its models in worker processes of their own, one per core.

    python -m potluck.serving.workers --precision auto models/urgency models/intent   # what the server spawns

    processes = ModelProcesses(["models/urgency"], precision="auto", count=2)
    await processes.start()                          # spawns them; returns once each has loaded and warmed up
    logits = await processes.run(0, [[101, 2023, 102]])   # model 0 of the list, (N, C) float32
    await processes.stop()

Why processes and not threads: CPython's GIL. A torch op lets go of the GIL while it computes, but
takes it back when it returns; a forward pass makes a few hundred such returns, and each one waits
while the event loop (HTTP, JSON, routing) holds the GIL, up to the 5 ms switch interval. Measured
here with MiniLM in bf16 on batches of 10 texts: next to a Python thread busy 25 % of the time, a
model thread ran 1.3-1.7x slower (two runs); at 32 clients the server ran 1.13x as many texts with
its models in processes as on threads (alternating runs), and 0.98-1.20x once the pure-ASGI predict
route had halved the server's own work per request. A process of its own has a GIL of its own.

Each worker loads every model folder (as `Predictor.from_folder` does, with one intra-op thread),
warms up, and then answers batches over its stdin and stdout, one at a time, in frames of our own
(no pickle): a 4-byte little-endian length, then

    request:  model index (u16), texts n (u32), n lengths (i32), the token ids one text after another (i32)
    answer:   status 0, n and C (u32 each), logits (n, C) float32  |  status 1, an error message (utf-8)

The server's event loop reads and writes the pipes itself (asyncio subprocess streams): no extra
thread in the server. A worker that dies fails its batch with an error and is replaced. Workers
ignore Ctrl+C (the server finishes its requests first, then closes their stdin) and die with the
server if it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_REQUEST = struct.Struct("<HI")  # model index, texts
_ANSWER = struct.Struct("<BII")  # status 0, rows, columns
READY = b"ready"


class ModelProcessError(RuntimeError):
    """A worker process failed to start, failed a batch, or died."""


def encode_request(model: int, ids: Sequence[Sequence[int]]) -> bytes:
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths.sum()))
    return _REQUEST.pack(model, len(ids)) + lengths.tobytes() + flat.tobytes()


def decode_request(payload: bytes) -> tuple[int, list[list[int]]]:
    model, n = _REQUEST.unpack_from(payload)
    lengths = np.frombuffer(payload, dtype=np.int32, count=n, offset=_REQUEST.size)
    flat = np.frombuffer(payload, dtype=np.int32, offset=_REQUEST.size + 4 * n).tolist()
    if len(flat) != int(lengths.sum()):
        raise ValueError("a request frame whose lengths do not add up")
    rows, start = [], 0
    for length in lengths.tolist():
        rows.append(flat[start:start + length])
        start += length
    return model, rows


def encode_answer(logits: np.ndarray) -> bytes:
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    return _ANSWER.pack(0, *logits.shape) + logits.tobytes()


def decode_answer(payload: bytes) -> np.ndarray:
    if payload[0] != 0:
        raise ModelProcessError(payload[1:].decode("utf-8", "replace"))
    _, rows, columns = _ANSWER.unpack_from(payload)
    return np.frombuffer(payload, dtype=np.float32, offset=_ANSWER.size).reshape(rows, columns).copy()


class _Worker:
    """One worker process and its pipes; one batch at a time."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    async def read_frame(self) -> bytes:
        try:
            (size,) = _LENGTH.unpack(await self.process.stdout.readexactly(_LENGTH.size))
            return await self.process.stdout.readexactly(size)
        except asyncio.IncompleteReadError as err:
            code = await self.process.wait()
            raise ModelProcessError(f"the model process {self.process.pid} exited (code {code})") from err

    async def call(self, payload: bytes) -> np.ndarray:
        self.process.stdin.write(_LENGTH.pack(len(payload)) + payload)
        try:
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as err:
            code = await self.process.wait()
            raise ModelProcessError(f"the model process {self.process.pid} exited (code {code})") from err
        return decode_answer(await self.read_frame())

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class ModelProcesses:
    """`count` worker processes that each hold every model of `folders`; `run` sends a batch to an idle one."""

    def __init__(self, folders: Sequence[str | os.PathLike], *, precision: str = "auto", backend: str = "torch",
                 count: int = 2, threads: int = 1, startup_timeout: float = 300.0):
        if count < 1:
            raise ValueError("count must be at least 1")
        self.folders = [str(f) for f in folders]
        self.precision = precision
        self.backend = backend
        self.count = count
        self.threads = threads
        self.startup_timeout = startup_timeout
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: list[_Worker] = []
        self._replacing: set[asyncio.Task] = set()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    async def start(self) -> None:
        """Spawn the workers; return once every one has loaded its models and warmed up."""
        self._idle = asyncio.Queue()
        started = time.perf_counter()
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.count)), return_exceptions=True)
        failed = [w for w in workers if isinstance(w, BaseException)]
        for worker in workers:
            if isinstance(worker, _Worker):
                self._workers.append(worker)
                self._idle.put_nowait(worker)
        if failed:
            await self.stop()
            raise failed[0]
        logger.info("%d model processes ready in %.1f s", self.count, time.perf_counter() - started)

    async def _spawn(self) -> _Worker:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "potluck.serving.workers", "--precision", self.precision,
            "--backend", self.backend, "--threads", str(self.threads), *self.folders,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            limit=2 ** 26)  # stderr stays the server's: a worker's own log lines show there
        worker = _Worker(process)
        try:
            ready = await asyncio.wait_for(worker.read_frame(), self.startup_timeout)
        except BaseException as err:  # it failed, timed out, or we were cancelled: no half-started worker stays
            if process.returncode is None:
                process.kill()
                await process.wait()
            if isinstance(err, ModelProcessError | TimeoutError):
                raise ModelProcessError(f"a model process did not start ({err or 'timed out'}); "
                                        "its error is above") from err
            raise
        if ready != READY:
            process.kill()
            raise ModelProcessError("a model process answered its start with something unexpected")
        return worker

    async def run(self, model: int, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (N, C) of model `model` (its index in `folders`) for token-id rows, in their order."""
        if self._idle is None:
            raise ModelProcessError("the model processes are not running")
        payload = encode_request(model, ids)
        worker = await self._idle.get()
        call = asyncio.get_running_loop().create_task(worker.call(payload))
        # the worker goes back to the idle ones when its answer is read, even if our caller is cancelled
        # first: a worker whose answer is still on its way must not be handed the next batch
        call.add_done_callback(lambda done: self._release(worker, done))
        return await asyncio.shield(call)

    def _release(self, worker: _Worker, call: asyncio.Task) -> None:
        if not call.cancelled():
            call.exception()  # retrieved here too, in case our caller was cancelled and never looks
        elif worker.alive:  # cut off between request and answer (the loop is closing): not to be trusted again
            worker.process.kill()
            return
        if worker.alive:
            if self._idle is not None:
                self._idle.put_nowait(worker)
            return
        # it died with this batch: the batch failed, a new worker takes its place
        logger.error("model process %d died (code %s); starting another", worker.process.pid,
                     worker.process.returncode)
        if worker in self._workers:
            self._workers.remove(worker)
        if self._idle is not None:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        try:
            worker = await self._spawn()
        except ModelProcessError:
            logger.exception("could not start a model process in place of one that died")
            return
        self._workers.append(worker)
        self._idle.put_nowait(worker)

    async def stop(self, timeout: float = 10.0) -> None:
        """Close every worker's stdin (they exit when it ends); kill those still running after `timeout`."""
        for task in list(self._replacing):
            task.cancel()
        for worker in self._workers:
            if worker.alive:
                worker.process.stdin.close()
        for worker in self._workers:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        self._workers.clear()
        self._idle = None


# -- the worker process -----------------------------------------------------------------------------

def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_batches(folders: Sequence[str], precision: str, threads: int, backend: str = "torch") -> None:
    """The worker's loop: load, warm up, say ready, then answer one batch after another until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is for the server, which stops us when it is done
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints must not end up in our frames
    source = sys.stdin.buffer

    import torch

    from potluck.distributed import die_with_parent
    from potluck.inference import Predictor

    die_with_parent()
    torch.set_num_threads(threads)
    predictors = [Predictor.from_folder(folder, precision=precision, backend=backend, workers=1) for folder in folders]
    for predictor in predictors:  # the first runs of a model pay one-off costs
        for n in (1, 4, 16):
            predictor.logits_from_ids(predictor.encode(["warm up the model"] * n), here=True)

    def send(payload: bytes) -> None:
        out.write(_LENGTH.pack(len(payload)) + payload)

    send(READY)
    while (head := _read_exactly(source, _LENGTH.size)) is not None:
        payload = _read_exactly(source, _LENGTH.unpack(head)[0])
        if payload is None:
            break
        try:
            model, rows = decode_request(payload)
            answer = encode_answer(predictors[model].logits_from_ids(rows, here=True))
        except Exception as err:  # the batch fails, the worker goes on
            logging.getLogger(__name__).exception("a batch failed")
            answer = b"\x01" + f"{type(err).__name__}: {err}".encode()
        send(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description="A model worker process of `potluck serve` (not run by hand).")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="model process %(process)d: %(message)s")
    logging.getLogger("potluck.hardware").setLevel(logging.ERROR)  # the server has said it once already
    serve_batches(args.folders, args.precision, args.threads, args.backend)


if __name__ == "__main__":
    main()
