"""What bf16 costs or gains on this CPU, for inference and for training: the measurement behind
potluck.hardware's fallback (bf16 asked on a CPU without native bf16 runs fp32).

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/precision.py        # 3 interleaved rounds

- inference: potluck.fastbert on the benchmark model (benchmarks/inference.py builds it), one thread,
  256 test texts in length-sorted batches of 64: fp32; bf16 weights without oneDNN packing (what bf16
  autocast gives: plain bf16 matmuls); bf16 weights packed for oneDNN where this CPU can pack them.
- training: MiniLM with a 4-label head, AdamW, one step on a batch of 16 ag_news texts (padded to the
  longest), both threads: fp32 against torch.autocast(bf16), as potluck finetune runs them.
Each figure is the best of the rounds; the ratio is bf16 / fp32 in the same run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings

import numpy as np
from common import SHARED_DATA, write_result
from inference import MODEL, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def texts(n: int) -> list[str]:
    with (SHARED_DATA / "ag_news" / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n), strict=False)]


def inference_methods(folder) -> dict:
    import torch

    from potluck.fastbert import FastBert, FastTokenizer
    from potluck.hardware import real_cpu

    runner, tokenizer = FastBert.from_folder(folder), FastTokenizer.from_folder(folder, 128)
    ids = tokenizer.encode(texts(256))
    order = np.argsort([len(r) for r in ids])
    batches = [[ids[i] for i in order[j:j + 64]] for j in range(0, len(order), 64)]
    variants = {"fp32": runner, "bf16 unpacked": copy.deepcopy(runner).to(torch.bfloat16)}
    if real_cpu().onednn_bf16:
        variants["bf16 packed"] = copy.deepcopy(runner).to(torch.bfloat16).pack()

    def timed(model):
        def run():
            torch.set_num_threads(1)
            started = time.perf_counter()
            for batch in batches:
                model.classify(batch)
            return len(ids) / (time.perf_counter() - started)  # texts/s
        return run
    return {name: timed(model) for name, model in variants.items()}


def training_methods(folder) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts(16), truncation=True, max_length=128, padding=True, return_tensors="pt")
    targets = torch.arange(16) % 4
    model = AutoModelForSequenceClassification.from_pretrained(folder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(bf16: bool):
        def run():
            torch.set_num_threads(os.cpu_count() or 1)
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits
            torch.nn.functional.cross_entropy(logits.float(), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
            return 16 / (time.perf_counter() - started)  # examples/s
        return run
    return {"fp32": step(False), "bf16 autocast": step(True)}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    build_model(MODEL)
    results = {}
    for part, methods, unit in (("inference", inference_methods(MODEL), "texts/s"),
                                ("training", training_methods(MODEL), "examples/s")):
        for fn in methods.values():
            fn()  # warm-up
        speeds = {name: [] for name in methods}
        for r in range(args.rounds):
            for name, fn in methods.items():
                speeds[name].append(fn())
                print(f"{part} round {r + 1}: {name:14s} {speeds[name][-1]:8.1f} {unit}", flush=True)
        best = {name: max(v) for name, v in speeds.items()}
        results[part] = {"unit": unit, "best": {k: round(v, 2) for k, v in best.items()},
                         "rounds": {k: [round(x, 2) for x in v] for k, v in speeds.items()},
                         "x_fp32": {k: round(v / best["fp32"], 3) for k, v in best.items()}}
    path = write_result("precision", {"model": str(MODEL), "rounds": args.rounds, "results": results})
    for part, r in results.items():
        print(f"{part}: " + ", ".join(f"{k} {v:.3f}x fp32" for k, v in r["x_fp32"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
