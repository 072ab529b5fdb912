"""Quality against the classical anchor: Potluck (embedded MiniLM) vs TF-IDF + logistic regression.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/quality.py                 # 7 datasets x 3 seeds
    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/quality.py --datasets trec --seeds 1 --seed-start 2
    .venv/bin/python benchmarks/quality.py --quick                                      # a 2-minute smoke run

Per dataset in ../shared/data and per seed: a stratified sample of --train-size training examples (the
seed picks the sample, the validation split, the head and the order), Potluck fine-tuned with default
settings (except --epochs) and the baseline fitted on exactly that sample, both scored on one fixed
stratified sample of at most --test-size test texts. Reports macro-F1 mean +- std and test ECE for both,
the difference in points, and where the goals stand: Potluck macro-F1 >= baseline + 5 points on average,
test ECE <= 1.5 % on every dataset.

Results go to benchmarks/results/quality.json after every (dataset, seed), so an interrupted run
continues where it stopped: a run with the same configuration skips what is already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common import DATASETS, machine, results_dir
from common import SHARED_DATA as DATA

GOAL_F1_POINTS = 5.0
GOAL_ECE = 0.015
PLANNED_SEEDS = 3  # the issue asks for 3 seeds per dataset
MODELS = ("potluck", "tfidf")  # Potluck and its anchor

logger = logging.getLogger("quality")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated names in ../shared/data")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds")
    p.add_argument("--seed-start", type=int, default=0, help="the first seed")
    p.add_argument("--train-size", type=int, default=2000, help="training examples per dataset (stratified)")
    p.add_argument("--test-size", type=int, default=2000, help="cap on test texts per dataset (stratified, fixed)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (early stopping may end sooner)")
    p.add_argument("--base", default="minilm", help="Potluck's base encoder")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<host kind>/quality.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 datasets, 300 train, 300 test, 1 epoch")
    args = p.parse_args(argv)
    args.out = args.out or results_dir() / "quality.json"
    if args.quick:
        args.datasets, args.train_size, args.test_size, args.epochs = "sms_spam,trec", 300, 300, 1
        args.seeds = 1
        args.out = args.out.with_name("quality-quick.json")
    return args


def load_results(path: Path, config: dict) -> dict:
    """The results so far when they were made with `config`; a fresh record otherwise."""
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config") == config:
            return old
        logger.warning("%s was made with another configuration: starting afresh", path)
    return {"benchmark": "quality", "config": config, "runs": {}}


def summarize(results: dict) -> None:
    """Per dataset mean +- std over the seeds run, the difference, and where the goals stand."""
    from potluck.evaluation import aggregate

    per_dataset, deltas = {}, []
    for name, all_runs in results["runs"].items():
        runs = {s: r for s, r in all_runs.items() if all(m in r for m in MODELS)}  # both models scored
        if not runs:
            continue
        row = {"seeds": sorted(int(s) for s in runs)}
        for model in ("potluck", "tfidf"):
            row[model] = aggregate([r[model] for r in runs.values()],
                                   keys=("macro_f1", "accuracy", "ece", "brier", "log_loss", "fit_seconds"))
        delta = 100 * (row["potluck"]["macro_f1"]["mean"] - row["tfidf"]["macro_f1"]["mean"])
        row["delta_macro_f1_points"] = round(delta, 2)
        row["potluck_ece_goal_met"] = row["potluck"]["ece"]["mean"] <= GOAL_ECE
        row["potluck_ece_worst_seed"] = max(row["potluck"]["ece"]["values"])
        per_dataset[name] = row
        deltas.append(delta)
    results["datasets"] = per_dataset
    complete = [n for n, r in per_dataset.items() if len(r["seeds"]) >= PLANNED_SEEDS]
    results["goals"] = {
        "macro_f1": {"goal": f"Potluck >= baseline + {GOAL_F1_POINTS} points on average",
                     "mean_delta_points": round(float(np.mean(deltas)), 2) if deltas else None,
                     "met": bool(deltas) and float(np.mean(deltas)) >= GOAL_F1_POINTS},
        "ece": {"goal": f"Potluck test ECE <= {GOAL_ECE:.1%} on every dataset (mean over seeds)",
                "datasets_met": [n for n, r in per_dataset.items() if r["potluck_ece_goal_met"]],
                "datasets_missed": [n for n, r in per_dataset.items() if not r["potluck_ece_goal_met"]],
                "met": all(r["potluck_ece_goal_met"] for r in per_dataset.values()) and bool(per_dataset)},
        "datasets_run": list(per_dataset), "datasets_with_all_seeds": complete,
        "complete": len(complete) == len(DATASETS), "planned_seeds": PLANNED_SEEDS,
    }


def run_one(name: str, seed: int, config: dict, done: dict, save) -> dict:
    """Fit and score each model on one (dataset, seed); `save(run)` after each, models in `done` skipped."""
    from potluck.curve import fit_and_score, stratified_sample
    from potluck.data import read_data
    from potluck.finetune import FinetuneSettings

    train = read_data(DATA / name / "train.jsonl")
    test = stratified_sample(read_data(DATA / name / "test.jsonl"), config["test_size"], seed=0)
    sample = stratified_sample(train, config["train_size"], seed=seed)
    settings = FinetuneSettings(epochs=config["epochs"])
    run = {**done, "n_train": len(sample), "n_test": len(test), "n_classes": len(set(train.labels))}
    for model in MODELS:
        if model not in run:  # a run killed after one model keeps that model's score
            run.update(fit_and_score(sample, test, seed=seed, base=config["base"], settings=settings,
                                     models=[model]))
            run["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            save(run)
    return run


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("potluck.data", "potluck.calibration", "potluck.baseline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from potluck.finetune import FinetuneSettings

    config = {"train_size": args.train_size, "test_size": args.test_size, "epochs": args.epochs,
              "base": args.base,
              "potluck_settings": asdict(FinetuneSettings(epochs=args.epochs)),
              "baseline": "TF-IDF word 1-2 + char_wb 2-5 grams, LogisticRegression, C in {1,10,100} by validation "
                          "macro-F1, temperature on the same 10% validation split",
              "test_sample": "fixed stratified sample (seed 0) of at most test_size texts of test.jsonl"}
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if not (DATA / d / "train.jsonl").exists()]
    if unknown:
        sys.exit(f"unknown dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    results = load_results(args.out, config)
    from potluck.hardware import cpu

    results.update(command=shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
                   machine={**machine(), "bf16": cpu().native_bf16})
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        for name in datasets:
            done = results["runs"].get(name, {}).get(str(seed), {})
            if all(m in done for m in MODELS):
                logger.info("%s seed %d: already in %s, skipped", name, seed, args.out)
                continue

            def save(run, name=name, seed=seed):
                results["runs"].setdefault(name, {})[str(seed)] = run
                summarize(results)
                write(args.out, results)

            run = run_one(name, seed, config, done, save)
            p, b = run["potluck"], run["tfidf"]
            logger.info("%s seed %d: Potluck macro-F1 %.4f ECE %.4f | TF-IDF macro-F1 %.4f ECE %.4f",
                        name, seed, p["macro_f1"], p["ece"], b["macro_f1"], b["ece"])
    summarize(results)
    write(args.out, results)
    print(table(results))


def write(path: Path, results: dict) -> None:
    from potluck.fileio import atomic_write_json

    results["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_json(path, results)


def table(results: dict) -> str:
    """The README table (Markdown)."""
    rows = ["| dataset | seeds | Potluck macro-F1 | TF-IDF+LR macro-F1 | Δ points | Potluck ECE | TF-IDF ECE |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.get("datasets", {}).items():
        p, b = r["potluck"], r["tfidf"]
        rows.append(f"| {name} | {len(r['seeds'])} | {100 * p['macro_f1']['mean']:.1f} ± {100 * p['macro_f1']['std']:.1f} "
                    f"| {100 * b['macro_f1']['mean']:.1f} ± {100 * b['macro_f1']['std']:.1f} "
                    f"| {r['delta_macro_f1_points']:+.1f} | {100 * p['ece']['mean']:.2f} % | {100 * b['ece']['mean']:.2f} % |")
    g = results.get("goals", {})
    if g:
        rows.append(f"\nmean Δ macro-F1: {g['macro_f1']['mean_delta_points']:+.2f} points "
                    f"(goal +{GOAL_F1_POINTS}: {'met' if g['macro_f1']['met'] else 'not met'}); "
                    f"ECE ≤ {GOAL_ECE:.1%} met on {len(g['ece']['datasets_met'])} of {len(results['datasets'])}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
