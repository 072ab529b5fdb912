"""Scale-out: fine-tuning examples/s and pre-training tokens/s with 1 and 2 processes (torchrun, gloo).

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/scale.py
    .venv/bin/python benchmarks/scale.py --train-size 300 --epochs 1 --pretrain-steps 10   # a quick look

Runs `potluck finetune --nproc N` and `potluck pretrain --nproc N` as a user would, on the same data
and the same effective batch, and reads the loop's examples/s from the model folder's potluck.json
(fine-tuning) and tokens/s from the command's last line (continued pre-training of MiniLM on the same
texts, --max-steps, blocks of 128, batch 32). On a 2-core machine two
processes share the same two cores (torchrun gives each one thread), so expect little or no gain
here: the point is that the same command scales where there are more cores or GPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_split, stratified_sample, write_result

from potluck.tables import write_rows


def run(nproc: int, data: Path, out: Path, epochs: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "potluck", "finetune", "--data", str(data), "--out", str(out),
           "--epochs", str(epochs), "--patience", str(epochs), "--precision", precision, "--nproc", str(nproc)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"nproc {nproc} failed:\n{result.stderr[-2000:]}")
    meta = json.loads((out / "potluck.json").read_text())
    return {"processes": nproc, "wall_seconds": round(wall, 1), **meta["training"],
            "valid_accuracy": round(meta["metrics"]["valid"]["accuracy"], 4),
            "valid_macro_f1": round(meta["metrics"]["valid"]["macro_f1"], 4)}


def run_pretrain(nproc: int, data: Path, out: Path, steps: int, precision: str) -> dict:
    import re

    cmd = [sys.executable, "-m", "potluck", "pretrain", "--corpus", str(data), "--from", "minilm", "--out", str(out),
           "--max-steps", str(steps), "--new-head-steps", "0", "--eval-every", "0", "--checkpoint-every", "0",
           "--precision", precision, "--nproc", str(nproc)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"pretrain nproc {nproc} failed:\n{result.stderr[-2000:]}")
    speed = re.search(r"\(([\d.]+) tokens/s", result.stderr)
    loss = re.search(r"held-out loss [\d.]+ -> ([\d.]+)", result.stderr)
    return {"processes": nproc, "wall_seconds": round(wall, 1), "steps": steps,
            "tokens_per_s": float(speed.group(1)), "held_out_loss": float(loss.group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sms_spam")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--pretrain-steps", type=int, default=40, help="optimiser steps of continued pre-training")
    args = parser.parse_args()
    texts, labels = stratified_sample(*load_split(args.dataset, "train"), args.train_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data, [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
        rows = [run(n, data, Path(tmp) / f"m{n}", args.epochs, args.precision) for n in (1, 2)]
        pre = [run_pretrain(n, data, Path(tmp) / f"e{n}", args.pretrain_steps, args.precision) for n in (1, 2)]
    for row in rows + pre:
        print(row)
    ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    pre_ratio = pre[1]["tokens_per_s"] / pre[0]["tokens_per_s"]
    path = write_result("scale", {
        "dataset": args.dataset, "train_size": args.train_size, "epochs": args.epochs, "effective_batch": 16,
        "finetune": rows, "speedup_2_vs_1": round(ratio, 2),
        "pretrain": pre, "pretrain_effective_batch_blocks": 32, "pretrain_speedup_2_vs_1": round(pre_ratio, 2),
        "gpu": "not measured: no GPU machine was lent to this task",
        "note": "2 processes on 2 cores, one thread each under torchrun, against 1 process with 2 threads"})
    print(f"2 processes vs 1: fine-tuning {ratio:.2f}x, pre-training {pre_ratio:.2f}x -> {path}")


if __name__ == "__main__":
    main()
