"""Pictures of a classifier's behaviour (matplotlib, PNG), for people to look at.

    potluck evaluate models/urgency --data test.csv --report reports/urgency/   # report.py calls these
    from potluck.plots import plot_confusion, plot_reliability, plot_per_class_f1, plot_training_log

Every function draws one figure with a title and labelled axes, writes it to `path` (atomically) and
returns the path. The Agg backend is chosen inside each call, so nothing needs a display.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from potluck.fileio import atomic_write_bytes

DPI = 110
COLORS = {"Potluck": "#1f6feb", "TF-IDF + LR": "#d1741f", "before calibration": "#8b949e"}
PALETTE = ["#1f6feb", "#d1741f", "#2da44e", "#8250df", "#cf222e"]
LABELS_ANNOTATED = 12   # up to this many classes, the confusion matrix prints the number in each cell
LABELS_NAMED = 100      # up to this many, every class is named on the axes; beyond, only indices


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def color(name: str, i: int = 0) -> str:
    return COLORS.get(name, PALETTE[i % len(PALETTE)])


def short(name: str, limit: int = 28) -> str:
    """`name` cut in the middle to at most `limit` characters, so names that share a start stay apart."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return name[: limit - 1 - tail] + "…" + name[-tail:]


def plot_confusion(rates: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                   title: str = "Confusion matrix (each row sums to 1)") -> Path:
    """Row-normalised confusion matrix: rows are true classes, columns predictions. Scales to ~100 classes."""
    plt = _pyplot()
    n = len(classes)
    side = float(np.clip(2.0 + 0.17 * n, 5.0, 16.0))
    fig, ax = plt.subplots(figsize=(side + 1.4, side))
    from matplotlib.colors import PowerNorm

    # many classes: a square-root colour scale, so the small confusions off the diagonal still show
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0) if n > LABELS_ANNOTATED else None
    image = ax.imshow(rates, cmap="Blues", norm=norm, vmin=None if norm else 0.0, vmax=None if norm else 1.0,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02,
                 label="share of the true class" + (" (square-root scale)" if norm else ""))
    if n <= LABELS_NAMED:
        font = float(np.clip(11 - 0.07 * n, 6, 10))
        names = [short(c, 26 if n > 30 else 40) for c in classes]
        ax.set_xticks(range(n), names, rotation=90, fontsize=font)
        ax.set_yticks(range(n), names, fontsize=font)
    else:
        step = max(1, n // 20)
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
    if n <= LABELS_ANNOTATED:
        for i in range(n):
            for j in range(n):
                if rates[i, j] >= 0.005:
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=9,
                            color="white" if rates[i, j] > 0.55 else "#24292f")
    ax.set_xlabel("predicted class" + ("" if n <= LABELS_NAMED else " (index)"))
    ax.set_ylabel("true class" + ("" if n <= LABELS_NAMED else " (index)"))
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, dict], path: str | os.PathLike, *,
                     title: str = "Reliability: is a 0.8 right 80 % of the time?") -> Path:
    """Accuracy against confidence per bin for each named curve (`evaluation.reliability_bins` + "ece"),
    marker area by the texts in the bin, and the share of predictions in each bin below."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.0), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    from matplotlib.lines import Line2D

    handles = top.plot([0, 1], [0, 1], linestyle="--", color="#57606a", linewidth=1, label="perfectly calibrated")
    width = 1.0 / len(next(iter(curves.values()))["count"])
    for i, (name, bins) in enumerate(curves.items()):
        count = np.asarray(bins["count"])
        used = count > 0
        conf, acc = np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used]
        label = f"{name} (ECE {100 * bins['ece']:.2f} %)" if "ece" in bins else name
        style = {"linestyle": ":"} if name == "before calibration" else {}
        share = count[used] / max(count.sum(), 1)
        top.plot(conf, acc, color=color(name, i), linewidth=1.2, alpha=0.6, **style)
        # a marker's area follows how many texts its bin holds: a bin of one text should not look like evidence
        top.scatter(conf, acc, s=12 + 250 * share, color=color(name, i), alpha=0.85, edgecolors="white",
                    linewidths=0.5)
        handles.append(Line2D([], [], color=color(name, i), marker="o", markersize=5, label=label, **style))
        centers = np.asarray(bins["edges"][:-1]) + width / 2
        offset = (i - (len(curves) - 1) / 2) * width / len(curves)
        bottom.bar(centers + offset, count / max(count.sum(), 1), width=width / len(curves),
                   color=color(name, i), alpha=0.8)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in the bin")
    top.set_title(title, pad=40)
    top.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8.5, frameon=False)
    top.grid(alpha=0.3)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("share of texts")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_per_class_f1(scores: Mapping[str, Mapping[str, float]], path: str | os.PathLike, *,
                      title: str = "F1 per class (worst at the top)") -> Path:
    """Horizontal bars of F1 per class, one bar per model, classes sorted by the first model's F1."""
    plt = _pyplot()
    models = list(scores)
    first = scores[models[0]]
    classes = sorted(first, key=lambda c: (-first[c], c))  # best at the bottom of the axis, worst on top
    n = len(classes)
    height = 0.8 / len(models)
    font = float(np.clip(11 - 0.07 * n, 6, 10))
    fig, ax = plt.subplots(figsize=(7.5, float(np.clip(1.2 + 0.12 * n * len(models) ** 0.5, 3.0, 26.0))))
    y = np.arange(n)
    for i, model in enumerate(models):
        ax.barh(y + (i - (len(models) - 1) / 2) * height, [scores[model].get(c, 0.0) for c in classes],
                height=height, color=color(model, i), label=model)
    ax.set_yticks(y, [short(c, 40) for c in classes], fontsize=font)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test data")
    ax.set_ylabel("class")
    ax.set_title(title, pad=22)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(models), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_training_log(rows: Sequence[dict], path: str | os.PathLike, *,
                      title: str = "Training loss per step, validation loss per epoch") -> Path:
    """The run's own log (training_log.jsonl): the raw and smoothed training loss, validation loss per epoch."""
    plt = _pyplot()
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    if steps:
        x = np.array([r["step"] for r in steps])
        loss = np.array([r["loss"] for r in steps])
        ax.plot(x, loss, color="#1f6feb", alpha=0.25, linewidth=1, label="training loss (each step)")
        window = max(1, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1:], smooth, color="#1f6feb", linewidth=2, label=f"training loss (mean of {window})")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["valid_loss"] for r in epochs], marker="o", color="#d1741f",
                linewidth=2, label="validation loss (end of epoch)")
        for r in epochs:
            ax.axvline(r["step"], color="#8b949e", linestyle=":", linewidth=0.8)
    ax.set_xlabel("optimiser step (dotted lines: end of an epoch)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    return _save(fig, path)


def plot_learning_curve(curve: dict, path: str | os.PathLike, *,
                        title: str = "Learning curve: test scores against the number of labels") -> Path:
    """Macro-F1 and ECE against training size (log scale): mean over seeds, ±1 std band, each seed a dot."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    names = {"potluck": "Potluck", "tfidf": "TF-IDF + LR"}
    for i, (model, by_size) in enumerate(curve["summary"].items()):
        name = names.get(model, model)
        sizes = np.array([int(s) for s in by_size])
        for ax, key, scale in ((left, "macro_f1", 1.0), (right, "ece", 100.0)):
            mean = scale * np.array([by_size[s][key]["mean"] for s in by_size])
            std = scale * np.array([by_size[s][key]["std"] for s in by_size])
            ax.plot(sizes, mean, marker="o", color=color(name, i), linewidth=2, label=f"{name} (mean)")
            ax.fill_between(sizes, mean - std, mean + std, color=color(name, i), alpha=0.18,
                            label=f"{name} (±1 std over seeds)")
            points = [p for p in curve["points"] if p["model"] == model]
            ax.scatter([p["size"] for p in points], [scale * p[key] for p in points], s=12,
                       color=color(name, i), alpha=0.6)
    seeds = len(curve.get("seeds", []))
    for ax, label in ((left, "macro-F1 on the test data"), (right, "ECE on the test data (%)")):
        ax.set_xscale("log")
        ax.set_xticks(curve["sizes"], [str(s) for s in curve["sizes"]])
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_title(f"macro-F1 ({seeds} seed{'s' * (seeds != 1)} per point)")
    right.set_title("calibration error (lower is better)")
    right.set_ylim(bottom=0)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title)
    return _save(fig, path)
