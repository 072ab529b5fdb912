"""Learning curves: test macro-F1 against the number of labelled examples, Potluck and the baseline, over seeds.

    potluck curve --data train.jsonl --test test.jsonl --sizes 100,500,2000 --base minilm --seeds 3 \\
        --report reports/curve/

    from potluck.curve import learning_curve
    result = learning_curve(train, test, sizes=[100, 500, 2000], seeds=[0, 1, 2], base="minilm")

Each (size, seed) draws its own stratified sample of the training data (every class present), fits
Potluck and the TF-IDF baseline on exactly that sample, and scores both on the same test data. The
spread over seeds is the spread a user would see from a different sample and a different run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from potluck.data import DataError, LabelledData, check_known_labels
from potluck.errors import UserError
from potluck.evaluation import aggregate, align_columns, classification_metrics, summary
from potluck.finetune import FinetuneSettings

logger = logging.getLogger(__name__)

MODELS = ("potluck", "tfidf")


def stratified_sample(data: LabelledData, n: int, seed: int) -> LabelledData:
    """`n` examples in proportion to the labels, every class at least once; deterministic per seed.

    All of `data` when n >= len(data). Within the sample the original order is kept.
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(data.labels)
    if n < len(counts):
        raise UserError(f"a sample of {n} cannot hold all {len(counts)} classes",
                        hint=f"use sizes of at least {len(counts)} (better: a few per class)")
    if n >= len(data):
        return data
    singles = [i for i, y in enumerate(data.labels) if counts[y] == 1]  # sklearn cannot stratify these
    pool = [i for i, y in enumerate(data.labels) if counts[y] > 1]
    picked, _ = train_test_split(pool, train_size=n - len(singles), random_state=seed,
                                 stratify=[data.labels[i] for i in pool])
    chosen = set(picked) | set(singles)
    rng = np.random.default_rng(seed)
    for label in sorted(counts.keys() - {data.labels[i] for i in chosen}):  # sklearn may leave a rare class out
        largest = Counter(data.labels[i] for i in chosen).most_common(1)[0][0]
        members = sorted(i for i in chosen if data.labels[i] == largest)
        chosen.remove(members[int(rng.integers(len(members)))])
        chosen.add(data.labels.index(label))
    return data.select(sorted(chosen))


def fit_and_score(train: LabelledData, test: LabelledData, *, seed: int, base: str = "minilm",
                  settings: FinetuneSettings | None = None, models: Sequence[str] = MODELS) -> dict:
    """Fit each of `models` on `train` with `seed` and score it on `test`: {model: metrics + seconds}."""
    from potluck.baseline import TfidfBaseline
    from potluck.classifier import TextClassifier

    classes = sorted(set(train.labels) | set(test.labels))
    check_known_labels(test, sorted(set(train.labels)))
    y_test = np.array([classes.index(y) for y in test.labels])
    settings = FinetuneSettings(**{**(settings or FinetuneSettings()).__dict__, "seed": seed})
    out = {}
    for name in models:
        start = time.perf_counter()
        if name == "potluck":
            model = TextClassifier(base, settings=settings).fit(train)
        elif name == "tfidf":
            model = TfidfBaseline(seed=seed).fit(train)
        else:
            raise UserError(f"unknown model '{name}'", hint=f"use one of: {', '.join(MODELS)}")
        fit_s = time.perf_counter() - start
        probs = align_columns(model.predict_proba(test.texts), model.classes_, classes)
        metrics = classification_metrics(y_test, probs, classes)
        out[name] = {**summary(metrics), "temperature": model.temperature_,
                     "fit_seconds": round(fit_s, 2), "score_seconds": round(time.perf_counter() - start - fit_s, 2)}
        logger.info("%s seed %d on %d examples: macro-F1 %.4f, ECE %.4f (%.0f s)", name, seed, len(train),
                    metrics["macro_f1"], metrics["ece"], fit_s)
    return out


def learning_curve(train: LabelledData, test: LabelledData, sizes: Sequence[int], seeds: Sequence[int], *,
                   base: str = "minilm", settings: FinetuneSettings | None = None,
                   models: Sequence[str] = MODELS,
                   on_point: Callable[[dict], None] | None = None) -> dict:
    """Every (size, seed): a stratified sample, each model fitted and scored. Returns points and summary."""
    if not sizes or not seeds:
        raise UserError("a learning curve needs at least one size and one seed")
    if test.labels is None:
        raise DataError("the test data has no labels", path=test.path, hint="pass labelled test data")
    points = []
    for size in sorted(set(sizes)):
        if size > len(train):
            logger.warning("size %d is more than the %d training examples: using all of them", size, len(train))
        for seed in seeds:
            sample = stratified_sample(train, size, seed)
            scores = fit_and_score(sample, test, seed=seed, base=base, settings=settings, models=models)
            for model, metrics in scores.items():
                point = {"size": len(sample), "seed": seed, "model": model, **metrics}
                points.append(point)
                if on_point:
                    on_point(point)
    return {"sizes": sorted({p["size"] for p in points}), "seeds": list(seeds), "models": list(models),
            "base": str(base), "n_test": len(test), "points": points, "summary": summarize(points)}


def summarize(points: Sequence[dict]) -> dict:
    """{model: {size: {metric: {mean, std, n, values}}}} over the seeds of each (model, size)."""
    out: dict = {}
    for model in dict.fromkeys(p["model"] for p in points):
        sizes = sorted({p["size"] for p in points if p["model"] == model})
        out[model] = {str(size): aggregate([p for p in points if p["model"] == model and p["size"] == size],
                                           keys=("macro_f1", "accuracy", "ece", "brier", "log_loss", "fit_seconds"))
                      for size in sizes}
    return out
