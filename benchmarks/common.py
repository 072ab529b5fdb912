"""Shared helpers for the benchmarks: the datasets in ../shared/data, samples, the host.

Results are filed by host kind (`potluck.hardware`: amx, avx512-bf16, avx512, avx2, x86-64) under
benchmarks/results/<kind>/, so figures from different kinds of CPU never mix; each file records its
host (CPU model, the flags that matter, cores, torch version)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ["sms_spam", "banking77", "trec", "sst2_sentences", "ag_news", "airline_sentiment", "subj"]


def load_split(name: str, split: str) -> tuple[list[str], list[str]]:
    path = SHARED_DATA / name / f"{split}.jsonl"
    if not path.exists():
        sys.exit(f"error: {path} is missing: the benchmarks read ../shared/data beside the repo")
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    return [r["text"] for r in rows], [str(r["label"]) for r in rows]


def stratified_sample(texts, labels, n: int, seed: int) -> tuple[list[str], list[str]]:
    """n examples keeping the label proportions (every label at least once where n allows)."""
    if n >= len(texts):
        return list(texts), list(labels)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(texts))
    counts = {y: labels.count(y) for y in set(labels)}
    stratify = labels if min(counts.values()) >= 2 else None
    keep, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=stratify)
    keep = sorted(keep)
    return [texts[i] for i in keep], [labels[i] for i in keep]


def machine() -> dict:
    """The host: CPU model, kind, the flags that decide a path, cores, torch and Python versions."""
    from potluck.hardware import cpu

    return cpu().record()


def results_dir() -> Path:
    """benchmarks/results/<this host's kind>/"""
    from potluck.hardware import cpu

    return RESULTS / cpu().kind


def write_result(name: str, payload: dict) -> Path:
    from potluck.fileio import atomic_write_json

    payload = {"benchmark": name, "when": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.argv]), "git": _git(), "machine": machine(), **payload}
    path = results_dir() / f"{name}.json"
    atomic_write_json(path, payload)
    return path


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
