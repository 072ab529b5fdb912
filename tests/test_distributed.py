"""Fine-tuning on two processes (torchrun, gloo on CPU) against one process with the same effective batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_encoder, toy_texts

from potluck import TextClassifier
from potluck.tables import write_rows

pytestmark = pytest.mark.timeout(300)
POTLUCK = [sys.executable, "-m", "potluck"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    encoder = make_tiny_encoder(folder / "enc", dropout=0.0)  # no dropout: the runs can agree exactly
    texts, labels = toy_texts(160)
    write_rows(folder / "train.csv", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    return folder, encoder


def finetune_args(folder, encoder, out, *extra):
    return [*POTLUCK, "finetune", "--data", str(folder / "train.csv"), "--base", str(encoder), "--out", str(out),
            "--epochs", "2", "--batch-size", "8", "--learning-rate", "3e-3", "--precision", "fp32", *extra]


def test_two_processes_match_one_with_the_same_effective_batch(setup):
    folder, encoder = setup
    one = subprocess.run(finetune_args(folder, encoder, folder / "one"), capture_output=True, text=True)
    two = subprocess.run(finetune_args(folder, encoder, folder / "two", "--nproc", "2"),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "2 processes, effective batch 8" in two.stderr
    assert two.stderr.count("fine-tuning") == 1 and two.stderr.count("saved") == 1  # rank 0 only talks
    texts = ["server down now", "thanks great call", "payment failed", "hello next week"]
    p1 = TextClassifier.load(folder / "one", precision="fp32").predict_proba(texts)
    p2 = TextClassifier.load(folder / "two", precision="fp32").predict_proba(texts)
    np.testing.assert_allclose(p1, p2, atol=2e-3)  # same batches; only float summation order differs


def _sitecustomize(tmp: Path, body: str) -> dict:
    """Inject a fault into rank 1 only, through a sitecustomize module on its PYTHONPATH."""
    tmp.mkdir(exist_ok=True)
    (tmp / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n" + body)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}


def test_a_user_error_on_one_rank_stops_the_run_with_that_error(setup, tmp_path):
    folder, encoder = setup
    env = _sitecustomize(tmp_path / "inject", (
        "    import potluck.data\n"
        "    def broken(*a, **k):\n"
        "        raise potluck.data.DataError('disk quota exceeded while reading', path='shard-1.csv', line=7)\n"
        "    potluck.data.read_data = broken\n"))
    start = time.time()
    result = subprocess.run(finetune_args(folder, encoder, tmp_path / "m", "--nproc", "2"), env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 1 failed: shard-1.csv:7: disk quota exceeded"), result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - start < 120 and not (tmp_path / "m").exists()


def test_a_crash_on_one_rank_does_not_hang(setup, tmp_path):
    folder, encoder = setup
    env = _sitecustomize(tmp_path / "inject", (
        "    import threading, time\n"
        "    threading.Thread(target=lambda: (time.sleep(6), os._exit(3)), daemon=True).start()\n"))
    start = time.time()
    result = subprocess.run(finetune_args(folder, encoder, tmp_path / "m", "--nproc", "2", "--epochs", "200",
                                          "--patience", "200"), env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "failed" in result.stderr.splitlines()[-1]
    assert time.time() - start < 150


def test_two_process_run_resumes_after_a_kill(setup, tmp_path):
    folder, encoder = setup
    out = tmp_path / "m"
    args = finetune_args(folder, encoder, out, "--nproc", "2", "--epochs", "30", "--patience", "30",
                         "--learning-rate", "1e-4")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = Path(str(out) + ".checkpoints")
    deadline = time.time() + 150
    while time.time() < deadline and not list(checkpoints.glob("epoch-000[2-9]")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(checkpoints.glob("epoch-*")), "no checkpoint before the kill"
    resumed = subprocess.run([*POTLUCK, "-v", *args[len(POTLUCK):], "--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and (out / "model.safetensors").exists()


def pretrain_args(folder, encoder, out, *extra):
    """Continued pre-training of the tiny encoder (no MLM head: 2 head-only steps first) on the texts."""
    return [*POTLUCK, "pretrain", "--corpus", str(folder / "train.csv"), "--from", str(encoder), "--out", str(out),
            "--block-size", "16", "--batch-size", "4", "--max-steps", "6", "--new-head-steps", "2",
            "--learning-rate", "1e-3", "--eval-every", "0", "--precision", "fp32", *extra]


def test_two_process_pretraining_matches_one_with_the_same_effective_batch(setup):
    from safetensors.torch import load_file

    folder, encoder = setup
    one = subprocess.run(pretrain_args(folder, encoder, folder / "enc-one"), capture_output=True, text=True)
    two = subprocess.run(pretrain_args(folder, encoder, folder / "enc-two", "--nproc", "2"),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes (effective batch 4 blocks)" in two.stderr
    assert two.stderr.count("pre-training") == 1 and two.stderr.count("saved") == 1  # rank 0 only talks
    w1, w2 = load_file(folder / "enc-one" / "model.safetensors"), load_file(folder / "enc-two" / "model.safetensors")
    start = load_file(encoder / "model.safetensors")
    moved = w1["bert.encoder.layer.0.attention.self.query.weight"] - start["encoder.layer.0.attention.self.query.weight"]
    assert moved.abs().max() > 1e-3  # the encoder trained after the head-only steps
    assert w1.keys() == w2.keys()
    for name in w1:  # same masks, same rows, same averaged gradients: only summation order differs
        np.testing.assert_allclose(w1[name].numpy(), w2[name].numpy(), atol=1e-4, err_msg=name)


def test_two_process_pretraining_resumes_after_a_kill(setup, tmp_path):
    folder, encoder = setup
    out = tmp_path / "enc"
    args = pretrain_args(folder, encoder, out, "--nproc", "2", "--max-steps", "400", "--checkpoint-every", "3")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = Path(str(out) + ".checkpoints")
    deadline = time.time() + 150
    while time.time() < deadline and not [p for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp")]:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp")]
    assert done, "no checkpoint before the kill"
    target = int(max(done).name.split("-")[1]) + 6  # six more steps than the last checkpoint holds
    resumed = subprocess.run([*POTLUCK, "-v", *args[len(POTLUCK):-4], "--max-steps", str(target), "--resume"],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and (out / "model.safetensors").exists()
    assert json.loads((out / "potluck.json").read_text())["training"]["steps"] == target, resumed.stderr[-3000:]
