"""Metrics for a classifier's probabilities, and the tables a report is made of.

    from potluck.evaluation import classification_metrics
    m = classification_metrics(y_true, probs, classes)   # accuracy, macro-F1, ECE, Brier, log-loss, per class
    m["roc_auc"], m["at_threshold"]                        # binary tasks only

All counting is scikit-learn's; ECE (15 equal-width bins, top label) is ours, in calibration.py. The
Brier score follows scikit-learn: (p - y)^2 of the positive class for binary tasks (range [0, 1]), the
sum over classes of (p_c - y_c)^2 for more classes (range [0, 2]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from potluck.calibration import expected_calibration_error

SUMMARY_KEYS = ("accuracy", "macro_f1", "ece", "brier", "log_loss")


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], *,
                           threshold: float = 0.5, positive: str | None = None) -> dict:
    """Summary and per-class metrics of probabilities `probs` (N, C) against integer labels.

    For two classes also ROC-AUC and precision / recall of `positive` (default: the second class,
    or the minority one when the labels say which) when it is predicted at probability >= `threshold`.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only to ~1e-7
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    metrics = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y_true),
        "brier": float(brier_score_loss(y_true, probs, labels=labels)),
        "log_loss": float(log_loss(y_true, probs, labels=labels)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
    }
    if len(classes) == 2:
        metrics.update(binary_metrics(y_true, probs, classes, threshold=threshold, positive=positive))
    return metrics


def binary_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, threshold: float = 0.5,
                   positive: str | None = None) -> dict:
    """ROC-AUC, and precision / recall of the positive class when it is called at p >= threshold."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    pos = list(classes).index(positive) if positive is not None else default_positive(classes)
    is_pos = y_true == pos
    called = probs[:, pos] >= threshold
    tp = int((is_pos & called).sum())
    out = {"roc_auc": float(roc_auc_score(is_pos, probs[:, pos])) if 0 < is_pos.sum() < len(is_pos) else None,
           "at_threshold": {"positive": classes[pos], "threshold": threshold,
                            "precision": tp / int(called.sum()) if called.any() else 0.0,
                            "recall": tp / int(is_pos.sum()) if is_pos.any() else 0.0}}
    return out


POSITIVE_NAMES = ("spam", "positive", "pos", "urgent", "yes", "true", "1", "subjective", "toxic", "fraud")


def default_positive(classes: Sequence[str]) -> int:
    """The class a person means by 'positive': a conventional name where there is one, else the second."""
    for i, name in enumerate(classes):
        if str(name).lower() in POSITIVE_NAMES:
            return i
    return 1


def summary(metrics: dict) -> dict:
    """The one-number metrics of a `classification_metrics` result (no per-class table)."""
    keys = (*SUMMARY_KEYS, "roc_auc")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std", "n", "values"}; std is the sample standard deviation (ddof=1), 0 for one value."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
            "values": [float(x) for x in v]}


def aggregate(runs: Sequence[dict], keys: Sequence[str] = SUMMARY_KEYS) -> dict:
    """Mean and std over seeds of each summary metric in `runs` (a list of metric dicts)."""
    return {k: mean_std([r[k] for r in runs]) for k in keys if all(r.get(k) is not None for r in runs)}


# -- what goes wrong --------------------------------------------------------------------------------

def normalised_confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, rows normalised to sum 1) of the confusion matrix; rows are true classes."""
    counts = confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
    rows = counts.sum(axis=1, keepdims=True)
    return counts, np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)


def worst_confusions(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], k: int = 10) -> list[dict]:
    """The k most frequent (true, predicted) mistakes, with their count and share of the true class."""
    counts, rates = normalised_confusion(y_true, y_pred, len(classes))
    np.fill_diagonal(counts, 0)
    order = np.argsort(-counts, axis=None, kind="stable")[:k]
    out = []
    for flat in order:
        i, j = np.unravel_index(flat, counts.shape)
        if counts[i, j] == 0:
            break
        out.append({"true": classes[i], "predicted": classes[j], "count": int(counts[i, j]),
                    "share_of_true": float(rates[i, j])})
    return out


def confident_mistakes(texts: Sequence[str], y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                       k: int = 8) -> list[dict]:
    """The k wrong predictions made with the highest probability, most confident first."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:k]
    return [{"text": texts[i], "true": classes[y_true[i]], "predicted": classes[y_pred[i]],
             "probability": float(probs[i, y_pred[i]]), "p_true": float(probs[i, y_true[i]])} for i in wrong]


def reliability_bins(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 15) -> dict:
    """Per confidence bin (equal width, the same bins as the ECE): count, mean confidence, accuracy."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    nonzero = np.maximum(count, 1)
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(),
            "confidence": (conf_sum / nonzero).tolist(), "accuracy": (acc_sum / nonzero).tolist()}


def align_columns(probs: np.ndarray, have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """Reorder the columns of `probs` (labelled `have`) to `want`; classes a model never saw get 0."""
    out = np.zeros((len(probs), len(want)), dtype=np.float64)
    index = {c: i for i, c in enumerate(have)}
    for j, c in enumerate(want):
        if c in index:
            out[:, j] = probs[:, index[c]]
    return out


def validation_summary(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """potluck.json's metrics: {"valid": the classification metrics without the per-class table}."""
    metrics = classification_metrics(labels, probs, classes)
    return {"valid": {k: v for k, v in metrics.items() if k != "per_class"}}
