"""Inference speed: transformers' pipeline against Potluck's Predictor in fp32, bf16 and int8, one run.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/inference.py            # 2000 texts, 5 rounds
    .venv/bin/python benchmarks/inference.py --quick                                 # 300 texts, 1 round

The model: all-MiniLM-L6-v2 (embedded) with a 4-label head fine-tuned by Potluck on 1000 examples of
ag_news train (seed 0, 1 epoch, calibrated), built once into models/bench-agnews-1k (or --model).
The texts: the test splits of ag_news, sst2_sentences, airline_sentiment and sms_spam, texts of 20-200
words, shuffled with seed 0, the first --texts of them; max_length 128.

Methods, each timed on all texts from raw strings to probabilities (tokenizing included), in rounds
that interleave the methods (the machine is shared: the best round is the least disturbed one; the
median is reported too). Only the methods this host runs natively are timed (the host is recorded;
results go to benchmarks/results/<host kind>/):
- pipeline: `pipeline("text-classification", batch_size=32)` with truncation to 128, all scores (the anchor);
- fp32: Predictor (potluck.fastbert: length-sorted, unpadded batches), the reference for agreement;
- bf16 (native bf16 only): Predictor with the weights cast to bf16 once and packed for oneDNN, larger
  token-budget batches; bf16-transformers: transformers' model with bf16 weights on the same
  length-sorted batches and workers (Potluck's bf16 path before potluck.fastbert, for comparison);
  without native bf16, bf16 runs fp32 (benchmarks/precision.py measures why);
- int8: Predictor with potluck.quantize's int8 (smoothed, per-row activations, per-channel weights);
- int8-dynamic: torch's plain `quantize_dynamic` on fastbert (Potluck's int8 before potluck.quantize);
- onnx-fp32, onnx-int8: `potluck export --int8` of the model on ONNX Runtime (Predictor(backend="onnx")).
Agreement is argmax agreement with fp32; max |dp| the largest probability difference to fp32. Every
Predictor runs its batches on one worker thread per core, two batches at a time here (the default).
The goal counts the fastest method with >= 99.5 % agreement: >= 12x the pipeline on an AMX host, >= 6x
on the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
from common import ROOT, SHARED_DATA, load_split, write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SOURCES = ["ag_news", "sst2_sentences", "airline_sentiment", "sms_spam"]
MODEL = ROOT / "models" / "bench-agnews-1k"
RECIPE = "TextClassifier(base='minilm', epochs=1, seed=0) on 1000 ag_news train examples (shuffled, seed 0)"


def bench_texts(n: int, seed: int = 0) -> list[str]:
    pool = []
    for name in SOURCES:
        with (SHARED_DATA / name / "test.jsonl").open(encoding="utf-8") as f:
            pool += [t for t in (json.loads(line)["text"] for line in f) if 20 <= len(t.split()) <= 200]
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} texts of 20-200 words in {SOURCES}")
    return pool[:n]


def build_model(folder: Path) -> float:
    """Fine-tune the benchmark model once; returns seconds spent (0 when it already exists)."""
    if (folder / "config.json").is_file():
        return 0.0
    from potluck import TextClassifier

    texts, labels = load_split("ag_news", "train")
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    order = order[:1000]
    started = time.perf_counter()
    clf = TextClassifier(base="minilm", epochs=1, seed=0).fit([texts[i] for i in order], [labels[i] for i in order])
    clf.save(folder, command=RECIPE)
    return time.perf_counter() - started


def methods(folder: Path) -> dict:
    """name -> a function texts -> probabilities (N, C) in the model's label order."""
    import warnings

    import torch
    from transformers import pipeline

    from potluck.calibration import softmax
    from potluck.export import export_onnx
    from potluck.hardware import cpu
    from potluck.inference import Predictor, fast_copy, run_batches

    pipe = pipeline("text-classification", model=str(folder), batch_size=32, device=-1)
    label_order = [pipe.model.config.id2label[i] for i in range(pipe.model.config.num_labels)]

    def run_pipeline(texts):
        out = pipe(texts, truncation=True, max_length=128, top_k=None)
        return np.array([[{d["label"]: d["score"] for d in row}[label] for label in label_order] for row in out])

    fp32 = Predictor.from_folder(folder, precision="fp32")
    runs = {"pipeline": run_pipeline, "fp32": fp32.predict_proba}
    predictors = {"fp32": fp32}
    if cpu().native_bf16:
        bf16 = Predictor.from_folder(folder, precision="bf16")
        hf_bf16 = fast_copy(fp32.model, "bf16")  # transformers' BertForSequenceClassification, bf16 weights

        def run_transformers_bf16(texts):
            return softmax(run_batches(hf_bf16, bf16.encode(texts), pad_id=bf16.pad_token_id, device=bf16.device,
                                       batch_size=bf16.batch_size, max_tokens=bf16.max_tokens, pool=bf16.pool))
        runs |= {"bf16-transformers": run_transformers_bf16, "bf16": bf16.predict_proba}
        predictors["bf16"] = bf16
    int8 = Predictor.from_folder(folder, precision="int8")
    dynamic = Predictor.from_folder(folder, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic.runner = torch.ao.quantization.quantize_dynamic(dynamic.reference, {torch.nn.Linear},
                                                                dtype=torch.qint8, inplace=False)
    runs |= {"int8": int8.predict_proba, "int8-dynamic": dynamic.predict_proba}
    predictors |= {"int8": int8, "int8-dynamic": dynamic}
    exported = folder.with_name(folder.name + "-onnx")
    if not (exported / "onnx" / "model_qint8.onnx").is_file():
        export_onnx(folder, exported, int8=True, overwrite=True)
    for precision in ("fp32", "int8"):
        onnx = Predictor.from_folder(exported, precision=precision, backend="onnx")
        runs[f"onnx-{precision}"], predictors[f"onnx-{precision}"] = onnx.predict_proba, onnx
    auto = Predictor.from_folder(folder, precision="auto")
    runs["_settings"] = {name: _settings(p) for name, p in predictors.items()}
    runs["_auto"] = auto.precision_used
    return runs


def _settings(p) -> dict:
    return {"batch_size": p.batch_size, "max_tokens": p.max_tokens, "precision": p.precision_used,
            "backend": p.backend, "workers": p.workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=MODEL, help="a model folder (built here if missing)")
    parser.add_argument("--quick", action="store_true", help="300 texts, 1 round")
    parser.add_argument("--out", default="inference", help="results name under benchmarks/results/")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.rounds, args.out = 300, 1, args.out + "-quick"
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    load_before = os.getloadavg()
    build_s = build_model(args.model)
    texts = bench_texts(args.texts)
    runs = methods(args.model)
    settings, auto = runs.pop("_settings"), runs.pop("_auto")
    for fn in runs.values():  # warm-up: first calls pay one-off costs (kernels, allocator)
        fn(texts[:64])

    speeds: dict[str, list[float]] = {name: [] for name in runs}
    probs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            started = time.perf_counter()
            probs[name] = np.asarray(fn(texts), dtype=np.float64)
            speeds[name].append(len(texts) / (time.perf_counter() - started))
            print(f"round {r + 1}: {name:18s} {speeds[name][-1]:7.1f} texts/s", flush=True)

    from potluck.inference import Predictor

    tokens = [len(row) for row in Predictor.from_folder(args.model, precision="fp32").encode(texts)]
    ref, anchor = probs["fp32"], max(speeds["pipeline"])
    results = {}
    for name in runs:
        best = max(speeds[name])
        results[name] = {
            "texts_per_s_best": round(best, 1), "texts_per_s_median": round(statistics.median(speeds[name]), 1),
            "texts_per_s_rounds": [round(s, 1) for s in speeds[name]],
            "x_pipeline_best": round(best / anchor, 2),
            "x_pipeline_median": round(statistics.median(speeds[name]) / statistics.median(speeds["pipeline"]), 2),
            "agreement_with_fp32": round(float(np.mean(probs[name].argmax(1) == ref.argmax(1))), 5),
            "max_abs_dp_vs_fp32": round(float(np.abs(probs[name] - ref).max()), 5),
            "mean_abs_dp_vs_fp32": round(float(np.abs(probs[name] - ref).mean()), 6),
        }
    from potluck.hardware import cpu

    target = 12 if cpu().kind == "amx" else 6
    keep = {name: r for name, r in results.items() if name != "pipeline" and r["agreement_with_fp32"] >= 0.995}
    fastest = max(keep, key=lambda name: keep[name]["x_pipeline_best"])
    goal = {"target": f">= {target}x pipeline at >= 99.5 % agreement on a {cpu().kind} host", "fastest_kept": fastest,
            "x_pipeline_best": keep[fastest]["x_pipeline_best"], "x_pipeline_median": keep[fastest]["x_pipeline_median"],
            "agreement": keep[fastest]["agreement_with_fp32"], "met": keep[fastest]["x_pipeline_best"] >= target,
            "auto_runs": auto}
    path = write_result(args.out, {
        "model": {"folder": str(args.model), "recipe": RECIPE, "built_in_this_run_s": round(build_s, 1)},
        "texts": {"n": len(texts), "sources": SOURCES, "words": "20-200", "seed": 0, "max_length": 128,
                  "tokens_mean": round(float(np.mean(tokens)), 1), "tokens_max": max(tokens),
                  "share_truncated_at_128": round(float(np.mean(np.array(tokens) >= 128)), 4)},
        "rounds": args.rounds, "predictor_settings": settings,
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads()},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results, "goal": goal})
    print(f"\n{'method':18s} {'best/s':>8s} {'median/s':>9s} {'x pipe':>7s} {'agree':>8s} {'max|dp|':>8s}")
    for name, r in results.items():
        print(f"{name:18s} {r['texts_per_s_best']:8.1f} {r['texts_per_s_median']:9.1f} {r['x_pipeline_best']:7.2f} "
              f"{100 * r['agreement_with_fp32']:7.2f}% {r['max_abs_dp_vs_fp32']:8.4f}")
    print(f"goal {goal['target']}: {'met' if goal['met'] else 'not met'} ({fastest} {goal['x_pipeline_best']}x); "
          f"auto runs {auto}; wrote {path}")


if __name__ == "__main__":
    main()
