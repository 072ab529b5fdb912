"""Scale-out: fine-tuning examples/s with 1 and 2 processes (torchrun, gloo) on this machine.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/scale.py
    .venv/bin/python benchmarks/scale.py --train-size 300 --epochs 1      # a quick look

Runs `potluck finetune --nproc N` as a user would, on the same data and the same effective batch, and
reads the training loop's examples/s from the model folder's potluck.json. On a 2-core machine two
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

from potluck.data import write_rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sms_spam")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    texts, labels = stratified_sample(*load_split(args.dataset, "train"), args.train_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data, [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
        rows = [run(n, data, Path(tmp) / f"m{n}", args.epochs, args.precision) for n in (1, 2)]
    for row in rows:
        print(row)
    ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    path = write_result("scale", {
        "dataset": args.dataset, "train_size": args.train_size, "epochs": args.epochs, "effective_batch": 16,
        "finetune": rows, "speedup_2_vs_1": round(ratio, 2),
        "gpu": "not measured: no GPU machine was lent to this task",
        "note": "2 processes on 2 cores, one thread each under torchrun, against 1 process with 2 threads"})
    print(f"2 processes vs 1: {ratio:.2f}x -> {path}")


if __name__ == "__main__":
    main()
