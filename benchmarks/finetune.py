"""Fine-tuning speed and quality: Potluck against transformers' Trainer, same base, data and settings.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/finetune.py            # sms_spam, trec, banking77
    .venv/bin/python benchmarks/finetune.py --datasets trec --train-size 400 --epochs 1   # a quick look

For each dataset: a stratified sample of --train-size examples (seed 0) split 90/10 into train and
validation. Both sides train on the same 90 % with the same hyper-parameters (batch 16, lr 5e-5, linear
decay with 10 % warm-up, weight decay 0.01, max_length 128, the same epochs, seed 0). Trainer runs
with its defaults otherwise (fp32, random batches with dynamic padding) and its time is `train()`
alone. Potluck's time is the whole `TextClassifier.fit`: loading, tokenising, training, a validation
pass each epoch and calibration, so the ratio is if anything unfair to Potluck. Potluck uses the 10 %
validation split for early stopping (patience = epochs, so it never stops early here) and calibration.
Both are scored on the whole test split: macro-F1, and ECE for Potluck (after calibration) and Trainer.
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
from potluck.data import LabelledData, stratified_split

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
    clf = TextClassifier("minilm", epochs=epochs, patience=epochs, precision=precision, **HPARAMS)
    start = time.perf_counter()
    clf.fit(train, valid=valid)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples_per_s": len(train) * epochs / seconds,
            "loop_examples_per_s": clf.fit_result_.examples_per_s, "probs": clf.predict_proba(test_texts),
            "classes": clf.classes_, "temperature": clf.temperature_}


def bench(name: str, train_size: int, epochs: int, precision: str) -> dict:
    texts, labels = load_split(name, "train")
    test_texts, test_labels = load_split(name, "test")
    texts, labels = stratified_sample(texts, labels, train_size, seed=0)
    train, valid = stratified_split(LabelledData(texts, labels), 0.1, seed=0)
    print(f"{name}: {len(train)} train, {len(valid)} valid, {len(test_texts)} test", flush=True)
    ours = run_potluck(train, valid, test_texts, epochs, precision)
    classes = ours["classes"]
    theirs = run_trainer(train, test_texts, classes, epochs)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(label, -1) for label in test_labels])
    row = {"train": len(train), "valid": len(valid), "test": len(test_texts), "epochs": epochs}
    for side, r in (("potluck", ours), ("trainer", theirs)):
        pred = r["probs"].argmax(axis=1)
        row[side] = {"seconds": round(r["seconds"], 1), "examples_per_s": round(r["examples_per_s"], 2),
                     "macro_f1": round(float(f1_score(y, pred, average="macro")), 4),
                     "ece": round(expected_calibration_error(r["probs"], y), 4)}
    row["potluck"]["loop_examples_per_s"] = round(ours["loop_examples_per_s"], 2)
    row["speedup"] = round(row["potluck"]["examples_per_s"] / row["trainer"]["examples_per_s"], 2)
    row["macro_f1_delta_points"] = round(100 * (row["potluck"]["macro_f1"] - row["trainer"]["macro_f1"]), 2)
    print(f"  potluck {row['potluck']}  trainer {row['trainer']}  speed-up {row['speedup']}x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sms_spam,trec,banking77")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="Potluck's precision: auto (bf16 here), fp32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = {**HPARAMS, "epochs": args.epochs, "train_size": args.train_size, "precision": args.precision}
    rows = {}
    for name in args.datasets.split(","):  # results are written after each dataset: a long run keeps its work
        rows[name] = bench(name, args.train_size, args.epochs, args.precision)
        summary = {"mean_speedup": round(float(np.mean([r["speedup"] for r in rows.values()])), 2),
                   "mean_macro_f1_delta_points": round(float(np.mean([r["macro_f1_delta_points"]
                                                                      for r in rows.values()])), 2),
                   "goal": ">= 4x Trainer's examples/s at macro-F1 within 0.5 point"}
        path = write_result("finetune", {"settings": settings, "datasets": rows, "summary": summary,
                                         "complete": len(rows) == len(args.datasets.split(","))})
    print(summary, "->", path)


if __name__ == "__main__":
    main()
