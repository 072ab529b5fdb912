"""One command line: potluck finetune | predict | evaluate | ...

    potluck finetune --data emails.csv --text-column body --label-column urgency --out models/urgency
    potluck predict models/urgency "The server is down and customers cannot pay"
    potluck evaluate models/urgency --data test.jsonl

The library logs; this module talks (progress bars, tables). A user's mistake (`UserError`) is one
line on stderr and exit code 2, never a traceback.
"""


import inspect
import json
import logging
import os
import shlex
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from potluck.errors import UserError

app = typer.Typer(help="Potluck: transfer learning for text, built together.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False, add_completion=False)
console = Console(stderr=True)
out = Console()

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def with_settings(cls, panel: str):
    """Add one CLI option per field of a settings dataclass (help from the field's metadata).

    The decorated command receives them in **kwargs; the dataclass stays the one place they are defined.
    """
    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        for f in fields(cls):
            kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
            option = typer.Option(help=f.metadata.get("help"), rich_help_panel=panel)
            default = f.default if f.default is not MISSING else None
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[kind, option]))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return decorate


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()  # its load reports are for developers, not users
    transformers.utils.logging.disable_progress_bar()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what the library does")] = False):
    setup_logging(verbose)


# -- finetune ---------------------------------------------------------------------------------------

from potluck.finetune import FinetuneSettings  # noqa: E402


@app.command()
@with_settings(FinetuneSettings, "Training")
def finetune(
    data: Annotated[Path, typer.Option(help="labelled training data: .csv, .tsv, .jsonl or .parquet")],
    out_dir: Annotated[Path, typer.Option("--out", help="the model folder to write")],
    base: Annotated[str, typer.Option(help="'minilm' (embedded), a model folder, or a hub id")] = "minilm",
    valid: Annotated[Path | None, typer.Option(help="validation data (default: a stratified split of --data)")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint of a killed run")] = False,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="where epoch checkpoints go (default: OUT.checkpoints)")] = None,
    **settings,
):
    """Fine-tune an encoder with a new classification head, then calibrate it."""
    from potluck.classifier import TextClassifier, remove_checkpoints
    from potluck.data import read_data

    train_data = read_data(data, text_column, label_column)
    valid_data = read_data(valid, text_column, label_column) if valid else None
    clf = TextClassifier(base, settings=FinetuneSettings(**settings))
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints")
    console.print(f"fine-tuning [bold]{base}[/] on {len(train_data)} examples from {data} "
                  f"({len(set(train_data.labels))} labels)")
    with TrainingProgress() as progress:
        clf.fit(train_data, valid=valid_data, checkpoint_dir=checkpoint_dir, resume=resume,
                on_step=progress.update)
    clf.data_.update(text_column=text_column, label_column=label_column,
                     train_path=str(data.resolve()), valid_path=str(valid.resolve()) if valid else None)
    clf.save(out_dir, command=shlex.join(["potluck", *sys.argv[1:]]))
    remove_checkpoints(checkpoint_dir)
    r, cal, m = clf.fit_result_, clf.calibration_, clf.metrics_["valid"]
    console.print(f"best epoch {r.best_epoch} of {r.epochs_run} ({r.examples_per_s:.1f} examples/s, "
                  f"{'bf16' if r.bf16 else 'fp32'}); validation accuracy {m['accuracy']:.3f}, "
                  f"macro-F1 {m['macro_f1']:.3f}")
    console.print(f"calibration: temperature {cal['temperature']:.3f}, "
                  f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    console.print(f"saved [bold]{out_dir}[/]")


class TrainingProgress:
    """A rich progress bar fed by the training loop's on_step callback."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"),
                                 TextColumn("{task.fields[speed]:.1f} ex/s"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.progress.__enter__()
        self.task = None
        return self

    def update(self, event: dict) -> None:
        if "epoch_end" in event:
            mark = " (best so far)" if event["improved"] else ""
            self.progress.console.print(f"epoch {event['epoch_end']}: validation loss {event['valid_loss']:.4f}{mark}")
            return
        if self.task is None:
            self.task = self.progress.add_task("train", total=event["total_steps"], epoch=1, loss=0.0, speed=0.0)
            self.progress.update(self.task, completed=event["step"] - 1)
        self.progress.update(self.task, completed=event["step"], epoch=event["epoch"], loss=event["loss"],
                             speed=event["examples_per_s"])

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


# -- predict ----------------------------------------------------------------------------------------

@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    texts: Annotated[list[str] | None, typer.Argument(help="texts to classify")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="a file of texts (.csv .tsv .jsonl .parquet .txt)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write predictions here (format by suffix)")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text in --input")] = "text",
    format: Annotated[str, typer.Option("--format", "-f", help="'table' or 'json' on stdout")] = "table",
    precision: Annotated[str, typer.Option(help="'auto', 'fp32', 'bf16' or 'int8'")] = "auto",
    batch_size: Annotated[int, typer.Option(help="texts per batch")] = 64,
):
    """Predict labels with calibrated probabilities for texts or a file of texts."""
    from potluck.data import read_texts, write_rows
    from potluck.inference import Predictor

    if format not in ("table", "json"):
        raise UserError(f"unknown --format '{format}'", hint="use 'table' or 'json'")
    if bool(texts) == bool(input):
        raise UserError("give either texts or --input FILE", hint="e.g. potluck predict MODEL \"a text\"")
    items = list(texts) if texts else read_texts(input, text_column).texts
    predictor = Predictor.from_folder(model, precision=precision, batch_size=batch_size)
    probs = predictor.predict_proba(items)
    labels = predictor.labels
    if output:
        rows = [{"text": t, "label": labels[int(p.argmax())], "score": float(p.max()),
                 **{f"p_{label}": float(v) for label, v in zip(labels, p, strict=True)}}
                for t, p in zip(items, probs, strict=True)]
        write_rows(output, rows)
        console.print(f"wrote {len(rows)} predictions to {output}")
        return
    ranked = [sorted(({"label": label, "score": round(float(v), 4)} for label, v in zip(labels, p, strict=True)),
                     key=lambda r: -r["score"]) for p in probs]
    if format == "json":
        out.print_json(json.dumps(ranked))
    elif len(items) == 1:
        width = max(len(label) for label in labels)
        for r in ranked[0]:
            out.print(f"{r['label']:<{width}}  {r['score']:.2f}", highlight=False)
    else:
        table = Table("text", "label", "probability")
        for text, r in zip(items, ranked, strict=True):
            table.add_row(text if len(text) <= 70 else text[:67] + "...", r[0]["label"], f"{r[0]['score']:.2f}")
        out.print(table)


# -- evaluate ---------------------------------------------------------------------------------------

@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    data: Annotated[Path, typer.Option(help="labelled test data")],
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    precision: Annotated[str, typer.Option(help="'auto', 'fp32', 'bf16' or 'int8'")] = "auto",
):
    """Accuracy, macro-F1, ECE and a per-class table on labelled data."""
    from potluck.classifier import TextClassifier
    from potluck.data import read_data

    clf = TextClassifier.load(model, precision=precision)
    metrics = clf.evaluate(read_data(data, text_column, label_column))
    if as_json:
        out.print_json(json.dumps(metrics))
        return
    print_metrics(metrics, title=f"{model} on {data}")


def print_metrics(metrics: dict, title: str) -> None:
    summary = Table("examples", "accuracy", "macro-F1", "ECE", title=title)
    summary.add_row(str(metrics["n"]), f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
                    f"{metrics['ece']:.4f}")
    out.print(summary)
    per_class = Table("label", "precision", "recall", "F1", "support")
    for label, m in metrics["per_class"].items():
        per_class.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(per_class)


# -- evaluation reports, baseline, learning curves (owner: evaluation) -------------------------------
# (end of evaluation section)


# -- tokenizer, pretrain, fill (owner: pre-training) ------------------------------------------------
# (end of pre-training section)


# -- serve (owner: serving) -------------------------------------------------------------------------
# (end of serving section)


# -- commons (owner: commons) -----------------------------------------------------------------------
# (end of commons section)


def main() -> None:
    """The console script: run the app, turning a user's mistake into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
