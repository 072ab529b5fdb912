"""What the command line shows: the two consoles, progress bars fed by the training loops, and tables."""


import json

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)  # talk: progress, notes, errors
out = Console()  # answers: predictions, tables, JSON


class StepProgress:
    """A rich progress bar fed by a training loop's on_step events: "finetune" (epoch, loss, examples/s,
    time left) or "pretrain" (step, loss, tokens/s, time spent; the total may shrink under --max-time).
    What the loop reports between steps (a validation loss, a held-out evaluation) is printed above it;
    `header` is printed when the first step arrives, i.e. after the data checks passed."""

    KINDS = {"finetune": ("epoch {task.fields[epoch]}", "loss {task.fields[loss]:.4f}",
                          "{task.fields[speed]:.1f} ex/s", "examples_per_s"),
             "pretrain": ("step", "loss {task.fields[loss]:.3f}", "{task.fields[speed]:.0f} tokens/s", "tokens_per_s")}

    def __init__(self, kind: str, header: str | None = None):
        self.kind, self.header = kind, header

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        label, loss, speed, _ = self.KINDS[self.kind]
        clock = TimeRemainingColumn() if self.kind == "finetune" else TimeElapsedColumn()
        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(loss),
                                 TextColumn(speed), clock, console=console, transient=False)
        self.progress.__enter__()
        self.task = None
        return self

    def update(self, event: dict) -> None:
        note = step_note(event)
        if note is not None:
            self.progress.console.print(note)
            return
        if self.task is None:
            if self.header:
                self.progress.console.print(self.header)
            self.task = self.progress.add_task(self.kind, total=event["total_steps"], epoch=1, loss=0.0, speed=0.0)
            self.progress.update(self.task, completed=event["step"] - 1)
        self.progress.update(self.task, total=event["total_steps"], completed=event["step"],
                             epoch=event.get("epoch", 1), loss=event["loss"], speed=event[self.KINDS[self.kind][3]])

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def step_note(event: dict) -> str | None:
    """The line for an event that is not a step: the end of an epoch, or a held-out evaluation."""
    if "epoch_end" in event:
        mark = " (best so far)" if event["improved"] else ""
        return f"epoch {event['epoch_end']}: validation loss {event['valid_loss']:.4f}{mark}"
    if event.get("eval"):
        return (f"step {event['step']}: held-out loss {event['loss']:.4f}, perplexity {event['perplexity']:.1f}, "
                f"accuracy {event['accuracy']:.3f}")
    return None


def print_predictions(texts: list[str], answers: list[list[dict]], output_format: str) -> None:
    """Ranked answers on stdout: JSON, one text's labels with their probabilities, or a table of texts."""
    if output_format == "json":
        out.print_json(json.dumps(answers))
    elif len(texts) == 1:
        width = max(len(r["label"]) for r in answers[0])
        for r in answers[0]:
            out.print(f"{r['label']:<{width}}  {r['score']:.2f}", highlight=False)
    else:
        table = Table("text", "label", "probability")
        for text, r in zip(texts, answers, strict=True):
            table.add_row(text if len(text) <= 70 else text[:67] + "...", r[0]["label"], f"{r[0]['score']:.2f}")
        out.print(table)


def print_metrics(metrics: dict, title: str, others: dict[str, dict] | None = None) -> None:
    """The summary (one row per model) and the per-class table, as rich tables on stdout."""
    from rich import box

    others = others or {}
    rows = {"Potluck" if others else "model": metrics, **others}
    binary = "roc_auc" in metrics
    summary = Table("", "n", "accuracy", "macro-F1", "ECE", "Brier", "log-loss",
                    *(["ROC-AUC"] if binary else []), title=title, box=box.SIMPLE_HEAD)
    summary.columns[0].no_wrap = True
    for name, m in rows.items():
        summary.add_row(name, str(m["n"]), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}",
                        f"{m['brier']:.4f}", f"{m['log_loss']:.4f}",
                        *([f"{m['roc_auc']:.4f}" if m.get("roc_auc") is not None else "-"] if binary else []))
    out.print(summary)
    if binary:
        for name, m in rows.items():
            t = m["at_threshold"]
            out.print(f"{name}: '{t['positive']}' at p >= {t['threshold']:g}: precision {t['precision']:.4f}, "
                      f"recall {t['recall']:.4f}", highlight=False)
    per_class = Table("label", "precision", "recall", "F1", *[f"F1 {n}" for n in others], "support")
    for label, m in metrics["per_class"].items():
        per_class.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                          *[f"{o['per_class'][label]['f1']:.3f}" for o in others.values()], str(m["support"]))
    out.print(per_class)


def print_curve(result: dict, title: str) -> None:
    """One row per size: each model's macro-F1 and ECE as mean ± std over the seeds."""
    names = {"potluck": "Potluck", "tfidf": "TF-IDF + LR"}
    columns = [f"{names.get(m, m)} {k}" for m in result["summary"] for k in ("macro-F1", "ECE")]
    table = Table("examples", *columns, title=title)
    for size in result["sizes"]:
        cells = []
        for by_size in result["summary"].values():
            m = by_size[str(size)]
            cells += [f"{m['macro_f1']['mean']:.4f} ± {m['macro_f1']['std']:.4f}",
                      f"{100 * m['ece']['mean']:.2f} ± {100 * m['ece']['std']:.2f} %"]
        table.add_row(str(size), *cells)
    out.print(table)

# (end of evaluation section)


def commons_tables(status: dict) -> list[Table]:
    bases = Table("version", "parent", "status", "made by", "weights", "scores (macro-F1)", "fused", "gate decision",
                  "created", title="Base versions")
    for b in status["bases"]:
        lineage = b.get("lineage") or {}
        scores = lineage.get("scores") or {}
        fused = ", ".join(str(i) for i in lineage.get("contributions", [])) or "-"
        bases.add_row(str(b["version"]), str(b["parent"] if b["parent"] is not None else "-"), b["status"],
                      b["method"], b["weights_sha"][:12], ", ".join(f"{t} {s:.3f}" for t, s in scores.items()) or "-",
                      fused, lineage.get("decision", "-"), b["created"])
    tasks = Table("task", "owner", "labels", "accepted contributions", "rejected", "state", title="Tasks")
    for t in status["tasks"]:
        labels = ", ".join(t["labels"][:6]) + (", …" if len(t["labels"]) > 6 else "")
        tasks.add_row(t["name"], t["owner_name"], labels, str(t["contributions"]), str(t.get("rejected", 0)),
                      t.get("state", "-"))
    contributions = Table("id", "kind", "from", "task", "base", "examples", "status", "use", "metrics / reason",
                          title="Contributions (newest first)")
    for c in status["contributions"]:
        note = c["reason"] or ", ".join(f"{k} {v:.3f}" for k, v in list(c["metrics"].items())[:3])
        if c["kind"] == "dataset":
            note = note or f"{c['n_eval']} held back" + (" (eval only)" if c["eval_only"] else "")
        contributions.add_row(str(c["id"]), c["kind"] + (" (job)" if c["job"] else ""), c["contributor_name"],
                              c["task_name"], str(c["base_version"] if c["base_version"] is not None else "-"),
                              str(c["n_examples"]), c["status"], c.get("use") or "-", note)
    rejections = status.get("rejections") or {"count": 0, "recent": []}
    rejected = Table("id", "kind", "from", "task", "base", "reason",
                     title=f"Rejections: {rejections['count']} in all (newest first)")
    for c in rejections["recent"]:
        rejected.add_row(str(c["id"]), c["kind"] + (" (job)" if c["job"] else ""), c["contributor_name"],
                         c["task_name"], str(c["base_version"] if c["base_version"] is not None else "-"), c["reason"])
    counts = status["jobs"]["counts"]
    jobs = Table("job", "task", "status", "worker", "attempts", "lease expires",
                 title="Jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    for j in status["jobs"]["open"]:
        jobs.add_row(str(j["id"]), j["task_name"], j["status"], j["worker"] or "-", str(j["attempts"]),
                     j["lease_expires"] or "-")
    board = Table("contributor", "weights", "datasets", "jobs done", "examples", title="Leaderboard")
    for r in status["leaderboard"]:
        board.add_row(r["contributor"], str(r["weights"]), str(r["datasets"]), str(r["jobs_done"]), str(r["examples"]))
    return [bases, tasks, contributions, rejected, jobs, board]
