"""The model processes of `potluck serve`: the Predictor's logits from another process, a failed batch
that fails alone, a dead worker replaced, and no worker left running after the server stops or dies."""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import Server, tiny_model

from potluck.inference import Predictor
from potluck.serving.workers import (
    ModelProcessError,
    ModelProcesses,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
)

TEXTS = ["server down now", "thanks great love", "payment failed today", "hello there", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_encoder):
    return [tiny_model(tmp_path_factory, tiny_encoder, name) for name in ("urgency", "intent")]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "(Z)" not in _state(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    except OSError:
        return "(gone)"


def test_frames_round_trip():
    ids = [[101, 5, 102], [101, 102], [7] * 130]
    assert decode_request(encode_request(3, ids)) == (3, ids)
    logits = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(decode_answer(encode_answer(logits)), logits)
    with pytest.raises(ModelProcessError, match="boom"):
        decode_answer(b"\x01boom")
    with pytest.raises(ValueError, match="do not add up"):
        decode_request(encode_request(0, ids)[:-4])


@pytest.mark.timeout(180)
def test_processes_answer_like_the_predictor_and_outlive_a_failed_batch_and_a_dead_worker(folders):
    predictors = [Predictor.from_folder(f, precision="fp32") for f in folders]
    ids = predictors[0].encode(TEXTS)
    expected = [p.logits_from_ids(ids) for p in predictors]

    async def main():
        processes = ModelProcesses(folders, precision="fp32", count=2)
        await processes.start()
        try:
            got = await asyncio.gather(processes.run(0, ids), processes.run(1, ids), processes.run(0, ids[2:3]))
            for logits, want in zip(got, [expected[0], expected[1], expected[0][2:3]], strict=True):
                np.testing.assert_allclose(logits, want, atol=1e-5)
            with pytest.raises(ModelProcessError, match="positions"):  # longer than the model can take
                await processes.run(0, [[2] + [5] * 400 + [3]])
            np.testing.assert_allclose(await processes.run(1, ids), expected[1], atol=1e-5)  # it went on

            first = processes.pids
            for pid in first:
                os.kill(pid, signal.SIGKILL)
            failures = await asyncio.gather(*(processes.run(0, ids) for _ in first), return_exceptions=True)
            assert all(isinstance(f, ModelProcessError) and "exited" in str(f) for f in failures)
            np.testing.assert_allclose(await asyncio.wait_for(processes.run(0, ids), 120), expected[0], atol=1e-5)
            deadline = time.monotonic() + 120
            while len(processes.pids) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(processes.pids) == 2 and not set(processes.pids) & set(first)
            return processes.pids
        finally:
            await processes.stop()

    assert gone(asyncio.run(main()))


@pytest.mark.timeout(120)
def test_a_model_process_that_cannot_start_is_one_clear_error(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")

    async def main():
        await ModelProcesses([broken], count=1).start()

    with pytest.raises(ModelProcessError, match="did not start"):
        asyncio.run(main())


@pytest.mark.timeout(180)
def test_no_model_process_outlives_the_server(folders):
    with Server(folders[0], "--precision", "fp32") as server:
        workers = children(server.process.pid)
        assert len(workers) >= 1
        assert httpx.post(server.url + "/predict", json={"inputs": "server down"}).status_code == 200
        server.process.send_signal(signal.SIGTERM)  # a graceful stop closes them
        server.process.wait(60)
    assert gone(workers)

    with Server(folders[0], "--precision", "fp32") as server:
        workers = children(server.process.pid)
        server.process.kill()  # no stop at all: they die with it
        server.process.wait(30)
    assert workers and gone(workers)
