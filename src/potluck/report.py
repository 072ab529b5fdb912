"""The evaluation report: metrics.json, PNG pictures and one self-contained index.html beside them.

    potluck evaluate models/urgency --data test.csv --report reports/urgency/ [--baseline tfidf]
    potluck curve --data train.jsonl --test test.jsonl --sizes 100,500,2000 --report reports/curve/

    from potluck.report import score_classifier, build_report
    runs = [score_classifier(clf, test)]
    build_report("reports/urgency", test, runs, classes=clf.classes_, title="urgency on test.csv")

It answers a user's three questions: is it better than the simple thing (the summary table, per-class
F1 bars), can I trust its probabilities (the reliability diagram, before and after calibration), and
where does it go wrong (the confusion matrix, the worst confusions, the most confident mistakes).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from potluck import evaluation, plots
from potluck.calibration import softmax
from potluck.data import LabelledData, check_known_labels
from potluck.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

PICTURES = ("per_class_f1.png", "reliability.png", "confusion.png", "training_loss.png")


@dataclass
class Scored:
    """One model's probabilities on the test data. Columns follow the report's classes."""

    name: str
    probs: np.ndarray                          # (N, C) calibrated
    uncalibrated: np.ndarray | None = None     # (N, C) before temperature scaling, when known
    calibration: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def score(self, y_true: Sequence[int], classes: Sequence[str], threshold: float = 0.5) -> Scored:
        self.metrics = evaluation.classification_metrics(y_true, self.probs, classes, threshold=threshold)
        if self.uncalibrated is not None:
            before = evaluation.classification_metrics(y_true, self.uncalibrated, classes, threshold=threshold)
            self.metrics["uncalibrated"] = evaluation.summary(before)
        return self


def labels_of(data: LabelledData, classes: Sequence[str]) -> np.ndarray:
    check_known_labels(data, classes)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[y] for y in data.labels])


def score_classifier(clf, data: LabelledData, *, threshold: float = 0.5) -> Scored:
    """A fitted or loaded TextClassifier on labelled data; 'before calibration' is softmax(logits * T)."""
    y = labels_of(data, clf.classes_)
    logits = clf.predictor_.logits(data.texts)  # (N, C), the temperature already folded in: z / T
    temperature = float(getattr(clf, "temperature_", 1.0) or 1.0)
    before = softmax(logits, 1.0 / temperature) if temperature != 1.0 else None
    return Scored("Potluck", softmax(logits), before, dict(clf.calibration_)).score(y, clf.classes_, threshold)


def score_baseline(baseline, data: LabelledData, classes: Sequence[str], *, threshold: float = 0.5) -> Scored:
    """A fitted TfidfBaseline on labelled data, its columns put in the order of `classes`."""
    y = labels_of(data, classes)
    logits = baseline.logits(data.texts)
    probs = evaluation.align_columns(softmax(logits, baseline.temperature_), baseline.classes_, classes)
    before = evaluation.align_columns(softmax(logits), baseline.classes_, classes)
    return Scored("TF-IDF + LR", probs, before, dict(baseline.calibration_)).score(y, classes, threshold)


def read_training_log(model_folder: str | os.PathLike) -> list[dict]:
    """The rows of a model folder's training_log.jsonl ([] when it has none); unreadable lines are skipped."""
    path = Path(model_folder) / "training_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def build_report(folder: str | os.PathLike, data: LabelledData, runs: Sequence[Scored], *,
                 classes: Sequence[str], title: str, about: dict | None = None,
                 training_log: Sequence[dict] | None = None, mistakes: int = 8) -> dict:
    """Write metrics.json, the PNGs and index.html into `folder`; return what metrics.json holds.

    The first run is the model the report is about; the others (a baseline) are compared with it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    main = runs[0]
    y = labels_of(data, classes)
    y_pred = main.probs.argmax(axis=1)
    pictures = {}
    question = "Is it better than the simple thing, class by class?" if len(runs) > 1 else "How good is it, class by class?"
    pictures["per_class_f1.png"] = (question, plots.plot_per_class_f1(
        {r.name: {c: m["f1"] for c, m in r.metrics["per_class"].items()} for r in runs},
        folder / "per_class_f1.png"))
    curves = {}
    if main.uncalibrated is not None:
        curves["before calibration"] = {**evaluation.reliability_bins(main.uncalibrated, y),
                                        "ece": main.metrics["uncalibrated"]["ece"]}
    for run in runs:
        curves[run.name] = {**evaluation.reliability_bins(run.probs, y), "ece": run.metrics["ece"]}
    pictures["reliability.png"] = ("Can I trust its probabilities?",
                                   plots.plot_reliability(curves, folder / "reliability.png"))
    _, rates = evaluation.normalised_confusion(y, y_pred, len(classes))
    pictures["confusion.png"] = ("Where does it go wrong?", plots.plot_confusion(
        rates, classes, folder / "confusion.png", title=f"{main.name}: confusion matrix (rows sum to 1)"))
    if training_log:
        pictures["training_loss.png"] = ("How did training go?",
                                         plots.plot_training_log(training_log, folder / "training_loss.png"))
    report = {
        "title": title, "created": datetime.now(UTC).isoformat(timespec="seconds"), "about": about or {},
        "data": {"path": data.path, "n": len(data)}, "classes": list(classes),
        "models": {r.name: {**r.metrics, "calibration": r.calibration} for r in runs},
        "worst_confusions": evaluation.worst_confusions(y, y_pred, classes, k=10),
        "confident_mistakes": evaluation.confident_mistakes(data.texts, y, main.probs, classes, k=mistakes),
        "pictures": list(pictures),
    }
    for stale in set(PICTURES) - set(pictures):  # from an earlier report in the same folder
        (folder / stale).unlink(missing_ok=True)
    atomic_write_json(folder / "metrics.json", report)
    atomic_write_text(folder / "index.html", render_html(report, {k: v[0] for k, v in pictures.items()}))
    logger.info("report written to %s", folder / "index.html")
    return report


def build_curve_report(folder: str | os.PathLike, curve: dict, *, title: str, about: dict | None = None) -> dict:
    """Write metrics.json, learning_curve.png and index.html for a `curve.learning_curve` result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots.plot_learning_curve(curve, folder / "learning_curve.png")
    report = {"title": title, "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "about": about or {}, **curve, "pictures": ["learning_curve.png"]}
    atomic_write_json(folder / "metrics.json", report)
    names = {"potluck": "Potluck", "tfidf": "TF-IDF + LR"}
    rows = []
    for size in curve["sizes"]:
        for model, by_size in curve["summary"].items():
            m = by_size[str(size)]
            rows.append([size, names.get(model, model), _pm(m["macro_f1"]), _pm(m["ece"], pct=True),
                         _pm(m["accuracy"]), f"{m['fit_seconds']['mean']:.0f}"])
    body = (_about(report["about"]) + "<h2>Learning curve</h2>" + _img("learning_curve.png", "learning curve")
            + "<h2>Mean ± std over seeds</h2>"
            + _table(["training examples", "model", "macro-F1", "ECE", "accuracy", "fit seconds"], rows)
            + f"<p class=note>{len(curve['seeds'])} seed(s) per point: each draws its own stratified sample, "
            f"split, head and order. Test data: {curve['n_test']} texts.</p>")
    atomic_write_text(folder / "index.html", _page(title, body))
    return report


# -- HTML ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1.2em;
color:#1f2328;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.93em}th,td{padding:.3em .7em;border-bottom:1px solid #d0d7de;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #d0d7de;border-radius:6px;margin:.4em 0}.note{color:#57606a;font-size:.9em}
.text{min-width:24em;max-width:38em;white-space:pre-wrap;overflow-wrap:anywhere}dl{display:grid;grid-template-columns:max-content 1fr;
gap:.1em 1em;font-size:.93em}dt{color:#57606a}dd{margin:0;word-break:break-all}b.best{color:#1a7f37}
"""

ROWS = [("accuracy", "accuracy ↑", False), ("macro_f1", "macro-F1 ↑", False), ("ece", "ECE (15 bins) ↓", True),
        ("brier", "Brier score ↓", False), ("log_loss", "log-loss ↓", False), ("roc_auc", "ROC-AUC ↑", False)]


def render_html(report: dict, pictures: dict[str, str]) -> str:
    """The page: summary, pictures, worst confusions, confident mistakes, per-class table. All text escaped."""
    models = report["models"]
    body = _about({**report["about"], "test data": f"{report['data']['path']} ({report['data']['n']} texts)"})
    body += "<h2>Summary</h2>" + _summary_table(models) + _calibration_note(models)
    for name, question in pictures.items():
        body += f"<h2>{html.escape(question)}</h2>" + _img(name, question)
        if name == "confusion.png":
            body += _confusions(report)
    return _page(report["title"], body + _per_class(models) + _glossary())


def _page(title: str, body: str) -> str:
    t = html.escape(title)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{t}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body><h1>{t}</h1>{body}<p class=note>Written by potluck.</p></body></html>\n")


def _img(name: str, alt: str) -> str:
    return f"<img src='{html.escape(name)}' alt='{html.escape(alt)}'>"


def _table(header: Sequence[str], rows: Sequence[Sequence], *, raw: bool = False, text_column: int | None = None) -> str:
    """An HTML table; every value escaped unless `raw` and already markup; numbers right-aligned."""
    def cell(j, v):
        text = v if raw and isinstance(v, str) and v.startswith("<") else html.escape(str(v))
        if j == text_column:
            return f"<td class=text>{text}</td>"
        number = isinstance(v, int | float) or str(v)[:1].isdigit() or str(v).startswith(("+", "-", "<b"))
        return f"<td class=num>{text}</td>" if number else f"<td>{text}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(j, v) for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _about(about: dict) -> str:
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in about.items()
                    if v not in (None, ""))
    return f"<dl>{items}</dl>" if items else ""


def _pm(m: dict, pct: bool = False) -> str:
    scale, unit = (100, " %") if pct else (1, "")
    return f"{scale * m['mean']:.{2 if pct else 3}f} ± {scale * m['std']:.{2 if pct else 3}f}{unit}"


def _summary_table(models: dict) -> str:
    columns = []  # (name, metrics, competes for "best")
    for name, m in models.items():
        columns.append((name, m, True))
        if "uncalibrated" in m:
            columns.append((f"{name}, uncalibrated", {**m, **m["uncalibrated"]}, False))
    rows = [["examples", *[str(m["n"]) for _, m, _ in columns]]]
    for key, label, pct in ROWS:
        values = [m.get(key) for _, m, _ in columns]
        if all(v is None for v in values):
            continue
        better = max if "↑" in label else min
        best = better(v for v, (_, _, competes) in zip(values, columns, strict=True) if competes and v is not None)
        rows.append([label, *[_value(v, pct, competes and v == best and len(models) > 1)
                              for v, (_, _, competes) in zip(values, columns, strict=True)]])
    thresholds = [m.get("at_threshold") for _, m, _ in columns]
    if thresholds[0]:
        t = thresholds[0]
        for key in ("precision", "recall"):
            label = f"{key} of '{t['positive']}' at p ≥ {t['threshold']:g}"
            rows.append([label, *[_value(x[key] if x else None, False, False) for x in thresholds]])
    return _table(["", *[n for n, _, _ in columns]], rows, raw=True)


def _value(v, pct: bool, best: bool) -> str:
    if v is None:
        return "–"
    text = f"{100 * v:.2f} %" if pct else f"{v:.4f}"
    return f"<b class=best>{text}</b>" if best else text


def _calibration_note(models: dict) -> str:
    notes = []
    for name, m in models.items():
        cal = m.get("calibration") or {}
        if cal.get("temperature") is not None:
            notes.append(f"{html.escape(name)}: temperature {cal['temperature']:.3f} fitted on its validation split"
                         + (f" (ECE there {100 * cal['ece_before']:.2f} % → {100 * cal['ece_after']:.2f} %)"
                            if "ece_before" in cal else ""))
    return "<p class=note>Green: the better calibrated model. " + "; ".join(notes) + ".</p>" if notes else ""


def _confusions(report: dict) -> str:
    worst = [[w["true"], w["predicted"], w["count"], f"{100 * w['share_of_true']:.1f} %"]
             for w in report["worst_confusions"]]
    out = "<h3>The worst confusions</h3>" + (_table(["true class", "predicted as", "texts", "share of the true class"],
                                                    worst) if worst else "<p>No mistakes.</p>")
    mistakes = [[_clip(m["text"]), m["true"], m["predicted"], f"{m['probability']:.3f}", f"{m['p_true']:.3f}"]
                for m in report["confident_mistakes"]]
    if mistakes:
        out += ("<h3>The most confident mistakes</h3>"
                + _table(["text", "true class", "predicted", "probability given", "probability of the truth"],
                         mistakes, text_column=0))
    return out


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _per_class(models: dict) -> str:
    names = list(models)
    first = models[names[0]]["per_class"]
    rows = []
    for c in sorted(first, key=lambda c: first[c]["f1"]):
        m = first[c]
        rows.append([c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                     *[f"{models[n]['per_class'][c]['f1']:.3f}" for n in names[1:]], m["support"]])
    header = ["class", "precision", "recall", f"F1 ({names[0]})", *[f"F1 ({n})" for n in names[1:]], "support"]
    return (f"<h2>Per class</h2><details {'open' if len(rows) <= 20 else ''}><summary>{len(rows)} classes, "
            f"worst F1 first ({html.escape(names[0])})</summary>" + _table(header, rows) + "</details>")


def _glossary() -> str:
    return ("<h2>What the numbers mean</h2><p class=note>Macro-F1: the F1 of each class, averaged with equal weight. "
            "ECE: the gap between confidence and accuracy, averaged over 15 equal-width confidence bins (0 is "
            "perfect). Brier score: mean squared error of the probabilities. Log-loss: mean negative log-probability "
            "of the true class. Uncalibrated: the same model before its temperature was applied.</p>")
