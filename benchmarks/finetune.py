"""Fine-tuning speed and quality: Potluck against transformers' Trainer, same base, data and settings.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/finetune.py    # sms_spam, trec, banking77; seeds 0,1
    .venv/bin/python benchmarks/finetune.py --datasets trec --train-size 400 --epochs 1 --seeds 0   # a quick look

For each dataset: a stratified sample of --train-size examples (seed 0) split 90/10 into train and
validation. Both sides train on the same 90 % with the same hyper-parameters (batch 16, lr 5e-5, linear
decay with 10 % warm-up, weight decay 0.01, max_length 128, the same epochs, seed 0). Trainer runs
with its defaults otherwise (fp32, random batches with dynamic padding) and its time is `train()`
alone. Potluck's time is the whole `TextClassifier.fit`: loading, tokenising, training, a validation
pass each epoch and calibration, so the ratio is if anything unfair to Potluck. Potluck uses the 10 %
validation split for early stopping (patience = epochs, so it never stops early here) and calibration.
Both are scored on the whole test split: macro-F1, and ECE for Potluck (after calibration) and Trainer.
Every (side, dataset, seed) runs in a fresh process, one after another; the table reports means over
the seeds (2 epochs on 1800 examples leaves banking77's 77 classes under-trained, where one seed's
macro-F1 moves by several points).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
import torch
from common import load_split, stratified_sample, write_result
from sklearn.metrics import f1_score

from potluck import TextClassifier
from potluck.calibration import expected_calibration_error, softmax
from potluck.data import LabelledData
from potluck.splits import stratified_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HPARAMS = dict(batch_size=16, learning_rate=5e-5, warmup_ratio=0.1, weight_decay=0.01, max_length=128, seed=0)


def run_trainer(train: LabelledData, test_texts, classes, epochs: int) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from potluck.encoders import resolve_base

    base = resolve_base("minilm")
    index = {c: i for i, c in enumerate(classes)}
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(HPARAMS["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(classes), id2label=dict(enumerate(classes)), label2id=index)
    enc = tokenizer(train.texts, truncation=True, max_length=HPARAMS["max_length"])
    rows = [{"input_ids": ids, "attention_mask": m, "labels": index[y]}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], train.labels, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=HPARAMS["batch_size"], num_train_epochs=epochs,
            learning_rate=HPARAMS["learning_rate"], warmup_steps=HPARAMS["warmup_ratio"],
            weight_decay=HPARAMS["weight_decay"], seed=HPARAMS["seed"], use_cpu=True, save_strategy="no",
            report_to="none", logging_strategy="no", disable_tqdm=True, per_device_eval_batch_size=64)
        trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        test_enc = tokenizer(test_texts, truncation=True, max_length=HPARAMS["max_length"])
        test_rows = [{"input_ids": i, "attention_mask": m}
                     for i, m in zip(test_enc["input_ids"], test_enc["attention_mask"], strict=True)]
        logits = trainer.predict(test_rows).predictions
    return {"seconds": seconds, "examples_per_s": len(train) * epochs / seconds, "probs": softmax(logits)}


def run_potluck(train: LabelledData, valid: LabelledData, test_texts, epochs: int, precision: str) -> dict:
    # head_learning_rate=0: the head trains at the same rate as the encoder, as in Trainer (Potluck's own
    # default gives the new head 10x; benchmarks/quality.py measures the defaults)
    clf = TextClassifier("minilm", epochs=epochs, patience=epochs, precision=precision, head_learning_rate=0,
                         **HPARAMS)
    start = time.perf_counter()
    clf.fit(train, valid=valid)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples_per_s": len(train) * epochs / seconds,
            "loop_examples_per_s": clf.fit_result_.examples_per_s, "probs": clf.predict_proba(test_texts),
            "classes": clf.classes_, "temperature": clf.temperature_}


def one(side: str, name: str, train_size: int, epochs: int, precision: str, seed: int) -> dict:
    """Train and score one side on one dataset with one seed (run in a fresh process by `main`)."""
    texts, labels = load_split(name, "train")
    test_texts, test_labels = load_split(name, "test")
    texts, labels = stratified_sample(texts, labels, train_size, seed=0)
    train, valid = stratified_split(LabelledData(texts, labels), 0.1, seed=0)
    HPARAMS["seed"] = seed
    if side == "potluck":
        r = run_potluck(train, valid, test_texts, epochs, precision)
    else:
        r = run_trainer(train, test_texts, sorted(set(train.labels)), epochs)
    index = {c: i for i, c in enumerate(sorted(set(train.labels)))}
    y = np.array([index.get(label, -1) for label in test_labels])
    row = {"seconds": round(r["seconds"], 1), "examples_per_s": round(r["examples_per_s"], 2),
           "macro_f1": round(float(f1_score(y, r["probs"].argmax(axis=1), average="macro")), 4),
           "ece": round(expected_calibration_error(r["probs"], y), 4),
           "train": len(train), "valid": len(valid), "test": len(test_texts)}
    if side == "potluck":
        row["loop_examples_per_s"] = round(r["loop_examples_per_s"], 2)
    return row


def in_fresh_process(side: str, name: str, args, seed: int) -> dict:
    """Each side in its own process: neither inherits the other's threads, caches or heap."""
    import json
    import subprocess
    import sys

    command = [sys.executable, __file__, "--one", side, "--datasets", name, "--train-size", str(args.train_size),
               "--epochs", str(args.epochs), "--precision", args.precision, "--seeds", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} on {name} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict) -> dict:
    """Per side: mean examples/s and macro-F1 over seeds; the speed-up and the F1 difference."""
    out = {}
    for side in ("potluck", "trainer"):
        rows = list(runs[side].values())
        out[side] = {"examples_per_s": round(float(np.mean([r["examples_per_s"] for r in rows])), 2),
                     "macro_f1": round(float(np.mean([r["macro_f1"] for r in rows])), 4),
                     "macro_f1_std": round(float(np.std([r["macro_f1"] for r in rows])), 4),
                     "ece": round(float(np.mean([r["ece"] for r in rows])), 4)}
    out["speedup"] = round(out["potluck"]["examples_per_s"] / out["trainer"]["examples_per_s"], 2)
    out["macro_f1_delta_points"] = round(100 * (out["potluck"]["macro_f1"] - out["trainer"]["macro_f1"]), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sms_spam,trec,banking77")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1", help="seeds for the head, order and dropout of both sides")
    parser.add_argument("--precision", default="auto", help="Potluck's precision: auto (bf16 here), fp32")
    parser.add_argument("--one", choices=["potluck", "trainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.one:
        import json

        print(json.dumps(one(args.one, args.datasets, args.train_size, args.epochs, args.precision, seeds[0])))
        return
    settings = {**HPARAMS, "seed": seeds, "epochs": args.epochs, "train_size": args.train_size,
                "precision": args.precision}
    rows = {}
    for name in args.datasets.split(","):  # results are written after each dataset: a long run keeps its work
        runs = {"potluck": {}, "trainer": {}}
        for seed in seeds:
            for side in ("potluck", "trainer"):
                runs[side][str(seed)] = in_fresh_process(side, name, args, seed)
                print(f"{name} seed {seed} {side}: {runs[side][str(seed)]}", flush=True)
        rows[name] = {**summarize(runs), "runs": runs}
        print(f"{name}: {rows[name]['speedup']}x, macro-F1 {rows[name]['macro_f1_delta_points']:+.2f} points", flush=True)
        summary = {"mean_speedup": round(float(np.mean([r["speedup"] for r in rows.values()])), 2),
                   "mean_macro_f1_delta_points": round(float(np.mean([r["macro_f1_delta_points"]
                                                                      for r in rows.values()])), 2),
                   "goal": ">= 4x Trainer's examples/s at macro-F1 within 0.5 point"}
        path = write_result("finetune", {"settings": settings, "datasets": rows, "summary": summary,
                                         "complete": len(rows) == len(args.datasets.split(","))})
    print(summary, "->", path)


if __name__ == "__main__":
    main()
