"""Does pre-training transfer? Four encoders fine-tuned on few labels, and MLM speed against Trainer.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/transfer.py                  # the full run
    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/transfer.py --only pretrain  # encoders only
    .venv/bin/python benchmarks/transfer.py --quick                                       # a smoke run

Pre-training corpus: the train texts of every dataset in ../shared/data (labels dropped). A WordPiece
tokenizer (--vocab-size) is trained on it. Encoders, all fine-tuned the same way per pair:
  (a) random:  a randomly initialised --size BERT with that tokenizer;
  (b) scratch: the same size pre-trained from scratch by `potluck pretrain` for --scratch-minutes;
  (c) minilm:  the embedded all-MiniLM-L6-v2;
  (d) adapted: MiniLM after continued pre-training on the corpus for --continued-minutes.
On each dataset, for each labelled-set size and seed: a stratified sample of that many train examples
(the seed picks it), `TextClassifier` fine-tuning (10 % of the sample held back for early stopping,
epochs per size in EPOCHS, lr 1e-4 for the small encoders and 5e-5 for MiniLM, max_length 64), scored by
macro-F1 on the test split (capped at --test-cap examples, the same for everyone). Each finished cell is
written to the results file at once; a rerun skips finished cells and finished encoders.

MLM speed: the same --size model, the same packed blocks of the corpus, batch 32 x 128, --speed-steps
steps after 3 warm-up steps, in this run: Potluck's loop against transformers' Trainer with
DataCollatorForLanguageModeling, in fp32 (its default) and with bf16=True; the three are run in turn
twice and each keeps its better run (other people's jobs share the cores). Encoders go to --work
(default /tmp/potluck-transfer), never into the repository.

Threads: one by default. On these two shared cores a mini MLM step took 1.66 s with one thread and
8.63 s with two while other jobs ran, and 1.08 s against 0.89 s when the machine was quiet: two
threads gain ~20 % alone and lose up to 5x in company.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, SHARED_DATA, load_split, results_dir, stratified_sample, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logger = logging.getLogger("transfer")

ENCODERS = {"a": "random", "b": "scratch", "c": "minilm", "d": "adapted"}
# one fine-tuning recipe per encoder family, the same for the pair it compares: (a) vs (b), (c) vs (d)
# The small pair trains its word embeddings too: (a)'s are random and must learn, and (b) gets the same.
SMALL = {"learning_rate": 2e-4, "epochs": {100: 20, 500: 8, 2000: 4}, "train_word_embeddings": True}
MINILM = {"learning_rate": 1e-4, "epochs": {100: 10, 500: 5, 2000: 2}, "train_word_embeddings": False}
RECIPE = {"a": SMALL, "b": SMALL, "c": MINILM, "d": MINILM}
MAX_LENGTH = 64


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["trec", "sst2_sentences", "sms_spam"])
    p.add_argument("--sizes", nargs="+", type=int, default=[100, 500, 2000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument("--size", default="mini", help="size of (a) and (b)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--scratch-minutes", type=float, default=30.0)
    p.add_argument("--continued-minutes", type=float, default=10.0)
    p.add_argument("--test-cap", type=int, default=1000)
    p.add_argument("--speed-steps", type=int, default=20)
    p.add_argument("--only", choices=["all", "pretrain", "speed", "finetune"], default="all")
    p.add_argument("--work", type=Path, default=Path("/tmp/potluck-transfer"))
    p.add_argument("--name", default="transfer", help="results file name under benchmarks/results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: probe 1 and 2 and take the faster); see the note on threads above")
    p.add_argument("--quick", action="store_true", help="a smoke run: trec, 100 labels, seed 0, 12-second budgets")
    args = p.parse_args()
    if args.quick:
        args.datasets, args.sizes, args.seeds = ["trec"], [100], [0]
        args.scratch_minutes = args.continued_minutes = 0.2
        args.speed_steps, args.name = 2, "transfer-quick"
        args.work = args.work.with_name(args.work.name + "-quick")
    return args


def load_corpus():
    from potluck.corpus import read_corpus

    files = sorted(glob.glob(str(SHARED_DATA / "*" / "train.jsonl")))
    return read_corpus(files), [Path(f).parent.name for f in files]


def make_tokenizer(corpus, work: Path, vocab_size: int) -> Path:
    from potluck.tokenization import save_tokenizer, train_tokenizer

    folder = work / f"tok-{vocab_size}"
    meta = folder / "potluck.json"
    if meta.is_file() and json.loads(meta.read_text())["corpus"]["fingerprint"] == corpus.fingerprint():
        return folder
    save_tokenizer(train_tokenizer(corpus.documents, vocab_size), folder, corpus=corpus, vocab_size=vocab_size)
    return folder


def make_random(tok: Path, work: Path, size: str) -> Path:
    """(a): a randomly initialised encoder (seed 0) saved as a model folder."""
    from potluck.pretrain import PretrainSettings, build_model
    from potluck.tokenization import load_tokenizer

    folder = work / f"random-{size}"
    if not (folder / "model.safetensors").is_file():
        tokenizer = load_tokenizer(tok)
        model, _, _ = build_model(tokenizer, PretrainSettings(size=size, seed=0))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def pretrain_encoder(corpus, out: Path, minutes: float, **kwargs) -> dict:
    """(b) or (d): pre-train within a time budget; resumes a killed run; skips a finished one."""
    from potluck.pretrain import PretrainSettings, pretrain

    if (out / "potluck.json").is_file():
        meta = json.loads((out / "potluck.json").read_text())
        if meta["settings"]["max_time"] == minutes * 60:
            return meta
    settings = PretrainSettings(epochs=1000, max_time=minutes * 60, eval_every=250, checkpoint_every=250,
                                size=kwargs.pop("size", "mini"))
    last = [0.0]

    def log(event: dict) -> None:
        if event.get("eval"):
            logger.info("%s step %d: held-out loss %.3f, accuracy %.3f", out.name, event["step"], event["loss"],
                        event["accuracy"])
        elif time.time() - last[0] > 60:
            last[0] = time.time()
            logger.info("%s step %d/%d loss %.3f, %.0f tokens/s", out.name, event["step"], event["total_steps"],
                        event["loss"], event["tokens_per_s"])

    checkpoints = out.with_name(out.name + ".checkpoints")
    pretrain(corpus, out, settings=settings, checkpoint_dir=checkpoints, resume=True, on_step=log,
             command=f"benchmarks/transfer.py ({minutes} min budget)", **kwargs)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return json.loads((out / "potluck.json").read_text())


def encoder_summary(meta: dict) -> dict:
    t, m = meta["training"], meta["metrics"]
    return {"steps": t["steps"], "tokens": t["tokens"], "seconds": t["seconds"], "tokens_per_s": t["tokens_per_s"],
            "precision": t["precision"], "stopped_by": t["stopped_by"], "parameters": meta["architecture"]["parameters"],
            "held_out_start": m["held_out_start"], "held_out_end": m["held_out"]}


def held_out_curve(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "loss": r["loss"], "accuracy": r["accuracy"]} for r in rows if "accuracy" in r]


# -- MLM speed against Trainer --------------------------------------------------------------------

def speed(corpus, tok: Path, size: str, steps: int) -> dict:
    from potluck.corpus import pack_blocks
    from potluck.mlm import Masker
    from potluck.pretrain import PretrainSettings, build_model, run, tokenize_corpus
    from potluck.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tok)
    warm = 3
    blocks = pack_blocks(tokenize_corpus(tokenizer, corpus.documents[:20000]), 128,
                         cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)[:32 * (steps + warm)]
    settings = PretrainSettings(size=size, batch_size=32, max_steps=steps + warm, eval_every=0,
                                checkpoint_every=0, valid_blocks=1, epochs=1000)
    stamps: list[float] = []
    runs: dict[str, list[float]] = {"potluck": [], "trainer_fp32": [], "trainer_bf16": []}
    for _ in range(2):
        stamps.clear()
        model, _, _ = build_model(tokenizer, settings)
        run(model, blocks, blocks[:1], Masker(tokenizer), settings, learning_rate=5e-4,
            on_step=lambda e: stamps.append(time.perf_counter()) if "loss" in e and not e.get("eval") else None)
        runs["potluck"].append(32 * 128 * steps / (stamps[-1] - stamps[warm - 1]))
        for name, bf16 in (("trainer_fp32", False), ("trainer_bf16", True)):
            runs[name].append(trainer_speed(tokenizer, blocks, settings, steps, warm, bf16))
        logger.info("MLM tokens/s so far: %s", runs)
    result: dict = {name: max(values) for name, values in runs.items()}
    result["all_runs"] = {name: [round(v, 1) for v in values] for name, values in runs.items()}
    result["ratio_vs_trainer_fp32"] = result["potluck"] / result["trainer_fp32"]
    result["ratio_vs_trainer_bf16"] = result["potluck"] / result["trainer_bf16"]
    result.update(batch=32, block_size=128, steps=steps, warmup_steps_excluded=warm, size=size,
                  potluck_precision="bf16" if _bf16() else "fp32")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def _bf16() -> bool:
    from potluck.hardware import plan_precision

    return plan_precision("auto", "cpu", purpose="training").bf16


def trainer_speed(tokenizer, blocks: np.ndarray, settings, steps: int, warm: int, bf16: bool) -> float:
    import tempfile

    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from potluck.pretrain import build_model

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    model, _, _ = build_model(tokenizer, settings)
    rows = [{"input_ids": row.tolist()} for row in blocks]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=32, max_steps=steps + warm,
                                 learning_rate=5e-4, warmup_steps=warm, weight_decay=0.01, use_cpu=True, bf16=bf16,
                                 save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
                                 dataloader_drop_last=True, seed=0)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                callbacks=[Stamp()]).train()
    return 32 * 128 * steps / (stamps[-1] - stamps[warm - 1])


# -- fine-tuning grid -----------------------------------------------------------------------------

def finetune_cell(base: Path | str, key: str, dataset: str, size: int, seed: int, test: tuple, train: tuple) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    from potluck import TextClassifier

    texts, labels = stratified_sample(*train, size, seed)
    recipe = RECIPE[key]
    epochs = recipe["epochs"].get(size, min(recipe["epochs"].values()))
    clf = TextClassifier(str(base), epochs=epochs, patience=epochs, calibrate=False, max_length=MAX_LENGTH,
                         learning_rate=recipe["learning_rate"], batch_size=16, seed=seed,
                         train_word_embeddings=recipe["train_word_embeddings"])
    start = time.perf_counter()
    clf.fit(texts, labels)
    predicted = clf.predict(test[0])
    return {"macro_f1": round(float(f1_score(test[1], predicted, average="macro")), 4),
            "accuracy": round(float(accuracy_score(test[1], predicted)), 4),
            "seconds": round(time.perf_counter() - start, 1), "epochs": epochs,
            "best_epoch": clf.fit_result_.best_epoch, "examples_per_s": round(clf.fit_result_.examples_per_s, 1)}


def capped_test(dataset: str, cap: int) -> tuple[list[str], list[str]]:
    texts, labels = load_split(dataset, "test")
    if len(texts) <= cap:
        return texts, labels
    return stratified_sample(texts, labels, cap, 0)


def table(cells: dict, datasets, sizes, keys) -> dict:
    out: dict = {}
    for d in datasets:
        for n in sizes:
            for k in keys:
                scores = [c["macro_f1"] for name, c in cells.items() if name.startswith(f"{d}/{n}/")
                          and name.endswith(f"/{k}")]
                if scores:
                    out.setdefault(d, {}).setdefault(str(n), {})[ENCODERS[k]] = {
                        "mean": round(float(np.mean(scores)), 4), "std": round(float(np.std(scores)), 4),
                        "seeds": len(scores)}
    return out


def checks(tab: dict) -> dict:
    b_over_a, d_vs_c = {}, {}
    for d, per_size in tab.items():
        for n, row in per_size.items():
            if "random" in row and "scratch" in row:
                b_over_a[f"{d}/{n}"] = round(row["scratch"]["mean"] - row["random"]["mean"], 4)
            if "minilm" in row and "adapted" in row:
                d_vs_c[f"{d}/{n}"] = round(row["adapted"]["mean"] - row["minilm"]["mean"], 4)
    return {"scratch_minus_random": b_over_a, "b_beats_a_everywhere": bool(b_over_a) and min(b_over_a.values()) > 0,
            "adapted_minus_minilm": d_vs_c, "d_at_least_c_everywhere": bool(d_vs_c) and min(d_vs_c.values()) >= 0,
            "d_at_least_c_on_average": bool(d_vs_c) and float(np.mean(list(d_vs_c.values()))) >= 0}


def plot(tab: dict, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(tab)
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(4.2 * (len(datasets) + 1), 3.8))
    for ax, d in zip(axes, datasets, strict=False):
        sizes = sorted(tab[d], key=int)
        for name in ENCODERS.values():
            pts = [(int(n), tab[d][n][name]) for n in sizes if name in tab[d][n]]
            if pts:
                xs, ms = [p[0] for p in pts], np.array([p[1]["mean"] for p in pts])
                sd = np.array([p[1]["std"] for p in pts])
                ax.plot(xs, ms, marker="o", label=name)
                ax.fill_between(xs, ms - sd, ms + sd, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks([int(n) for n in sizes], [str(n) for n in sizes])
        ax.set_title(d)
        ax.set_xlabel("labelled examples")
        ax.set_ylabel("test macro-F1")
        ax.grid(alpha=0.3)
    axes[0].legend()
    ax = axes[-1]
    for name, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], marker=".", label=name)
    ax.set_title("pre-training: held-out MLM loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def choose_threads() -> tuple[int, dict]:
    """Time a mini MLM step (32 x 128, bf16 where available) with 2 and 1 torch threads and take the faster:
    on cores shared with other work, two threads can wait on each other and be the slower."""
    from transformers import BertConfig, BertForMaskedLM

    from potluck.pretrain import SIZES

    model = BertForMaskedLM(BertConfig(vocab_size=8000, **SIZES["mini"]))
    ids = torch.randint(5, 8000, (32, 128))
    times = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        spent = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            spent.append(time.perf_counter() - start)
        times[threads] = round(1000 * min(spent[1:]), 1)
    best = min(times, key=times.get)
    logger.info("thread probe (ms per step): %s -> %d thread(s)", times, best)
    return best, times


# -- the run --------------------------------------------------------------------------------------

def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("potluck").setLevel(logging.WARNING)  # the library's per-epoch lines; ours stay
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    probe = None
    if not args.threads:
        args.threads, probe = choose_threads()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    config = {"size": args.size, "vocab_size": args.vocab_size, "scratch_minutes": args.scratch_minutes,
              "continued_minutes": args.continued_minutes, "test_cap": args.test_cap,
              "recipes": {ENCODERS[k]: v for k, v in RECIPE.items()}, "max_length": MAX_LENGTH, "batch_size": 16,
              "early_stopping": "patience = epochs (never stops early); the best validation-loss epoch is kept",
              "calibrate": False}
    config = json.loads(json.dumps(config))
    path = results_dir() / f"{args.name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    same = old.get("config") == config
    if old and not same:
        logger.info("%s was made with another configuration: starting the grid afresh", path)
    payload = {"config": config, "datasets": args.datasets, "sizes": args.sizes, "seeds": args.seeds,
               "encoders": {k: ENCODERS[k] for k in args.encoders}, "threads": torch.get_num_threads(),
               "thread_probe_ms_per_step": probe,
               "work": str(args.work), "cells": dict(old.get("cells", {})) if same else {},
               "speed": old.get("speed") if same else None, "pretraining": old.get("pretraining", {}) if same else {},
               "load_average_start": os.getloadavg()}
    began = time.perf_counter()
    corpus, names = load_corpus()
    tok = make_tokenizer(corpus, args.work, args.vocab_size)
    payload["corpus"] = {"datasets": names, "documents": len(corpus), "characters": corpus.n_characters(),
                         "fingerprint": corpus.fingerprint(), "tokenizer_vocab": args.vocab_size}
    bases: dict[str, Path | str] = {"c": "minilm"}
    curves = {}
    if args.only in ("all", "pretrain", "finetune"):
        if "a" in args.encoders:
            bases["a"] = make_random(tok, args.work, args.size)
        if "b" in args.encoders:
            bases["b"] = args.work / f"scratch-{args.size}"
            meta = pretrain_encoder(corpus, bases["b"], args.scratch_minutes, tokenizer=tok, size=args.size)
            payload["pretraining"]["scratch"] = encoder_summary(meta)
            curves["scratch"] = held_out_curve(bases["b"])
            write_result(args.name, payload)
        if "d" in args.encoders:
            bases["d"] = args.work / "minilm-adapted"
            meta = pretrain_encoder(corpus, bases["d"], args.continued_minutes, base="minilm")
            payload["pretraining"]["adapted"] = encoder_summary(meta)
            curves["adapted"] = held_out_curve(bases["d"])
            write_result(args.name, payload)
    if args.only in ("all", "speed") and (payload["speed"] is None or args.only == "speed"):
        payload["speed"] = speed(corpus, tok, args.size, args.speed_steps)
        logger.info("MLM tokens/s: %s", payload["speed"])
        write_result(args.name, payload)
    if args.only in ("all", "finetune"):
        run_grid(args, bases, payload)
    payload["table"] = table(payload["cells"], args.datasets, args.sizes, args.encoders)
    payload["checks"] = checks(payload["table"])
    payload["seconds_this_run"] = round(time.perf_counter() - began, 1)
    payload["load_average_end"] = os.getloadavg()
    if payload["table"]:
        plot(payload["table"], curves, results_dir() / f"{args.name}.png")
        payload["picture"] = str((results_dir() / f"{args.name}.png").relative_to(ROOT))
    print(write_result(args.name, payload))
    print(json.dumps({"table": payload["table"], "checks": payload["checks"], "speed": payload["speed"]}, indent=1))


def run_grid(args, bases: dict, payload: dict) -> None:
    for dataset in args.datasets:
        payload.setdefault("test_sizes", {})[dataset] = len(capped_test(dataset, args.test_cap)[0])
    for size in args.sizes:
        for dataset in args.datasets:
            train, test = load_split(dataset, "train"), capped_test(dataset, args.test_cap)
            for seed in args.seeds:
                for key in args.encoders:
                    name = f"{dataset}/{size}/{seed}/{key}"
                    if name in payload["cells"]:
                        continue
                    cell = finetune_cell(bases[key], key, dataset, size, seed, test, train)
                    payload["cells"][name] = cell
                    logger.info("%s (%s): macro-F1 %.4f in %.0f s", name, ENCODERS[key], cell["macro_f1"],
                                cell["seconds"])
                    payload["table"] = table(payload["cells"], args.datasets, args.sizes, args.encoders)
                    write_result(args.name, payload)


if __name__ == "__main__":
    main()
