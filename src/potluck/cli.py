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
from potluck.fileio import check_output

app = typer.Typer(help="Potluck: transfer learning for text, built together.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)
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

    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RANK", "0") != "0":
        level = logging.ERROR  # under torchrun only rank 0 talks
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)])
    # what runs instead of what was asked (potluck.hardware) is one line, however wide the terminal
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("note: %(message)s"))
    hardware_log = logging.getLogger("potluck.hardware")
    hardware_log.handlers, hardware_log.propagate = [notes], False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' load reports and progress bars are for developers, not users. Set through its
    # environment variables when it is not imported yet: `potluck predict` may never import it.
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    nproc: Annotated[int, typer.Option(help="training processes on this machine (spawns torchrun)")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")] = False,
    **settings,
):
    """Fine-tune an encoder with a new classification head, then calibrate it."""
    from potluck import distributed
    from potluck.classifier import TextClassifier, remove_checkpoints
    from potluck.data import read_data

    ctx = distributed.context()
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and not ctx.enabled:
        distributed.launch(nproc, without_option(sys.argv[1:], "--nproc"))
        return

    check_output(out_dir, overwrite=overwrite)  # before the training, not after it
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints")
    check_output(checkpoint_dir, overwrite=True, option="--checkpoint-dir")
    train_data = read_data(data, text_column, label_column)
    valid_data = read_data(valid, text_column, label_column) if valid else None
    clf = TextClassifier(base, settings=FinetuneSettings(**settings))
    header = (f"fine-tuning [bold]{base}[/] on {len(train_data)} examples from {data} "
              f"({len(set(train_data.labels))} labels)")
    with TrainingProgress(header) as progress:
        clf.fit(train_data, valid=valid_data, checkpoint_dir=checkpoint_dir, resume=resume,
                on_step=progress.update)
    clf.data_.update(text_column=text_column, label_column=label_column,
                     train_path=str(data.resolve()), valid_path=str(valid.resolve()) if valid else None)
    if not ctx.is_main:
        return  # rank 0 writes the folder and reports
    clf.save(out_dir, command=shlex.join(["potluck", *sys.argv[1:]]), overwrite=overwrite)
    remove_checkpoints(checkpoint_dir)
    r, cal, m = clf.fit_result_, clf.calibration_, clf.metrics_["valid"]
    procs = f", {r.world_size} processes, effective batch {clf.settings.batch_size}" if r.world_size > 1 else ""
    console.print(f"best epoch {r.best_epoch} of {r.epochs_run} ({r.examples_per_s:.1f} examples/s, "
                  f"{'bf16' if r.bf16 else 'fp32'}{procs}); validation accuracy {m['accuracy']:.3f}, "
                  f"macro-F1 {m['macro_f1']:.3f}")
    if "not_kept" in cal:
        console.print(f"calibration not kept: {cal['not_kept']}; the model's own probabilities stay", highlight=False)
    else:
        console.print(f"calibration: temperature {cal['temperature']:.3f}, "
                      f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    console.print(f"saved [bold]{out_dir}[/]")


def without_option(argv: list[str], name: str) -> list[str]:
    """argv less `name VALUE` / `name=VALUE` (to hand the rest of a command line to torchrun)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


class TrainingProgress:
    """A rich progress bar fed by the training loop's on_step callback."""

    def __init__(self, header: str):
        self.header = header  # printed when training starts, i.e. after the data checks passed

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
            self.progress.console.print(self.header)
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
    precision: Annotated[str, typer.Option(help="'auto' (the fastest that keeps 99.5 % agreement with fp32 on this "
                                                "CPU), 'fp32', 'bf16' or 'int8'")] = "auto",
    backend: Annotated[str, typer.Option(help="'torch', or 'onnx' for the folder's ONNX export (`potluck export`)")] = "torch",
    batch_size: Annotated[int | None, typer.Option(help="texts per batch (default: 128 in bf16, 64 otherwise)")] = None,
    fp32_check: Annotated[int, typer.Option(help="with --input and a precision other than fp32: re-score this many "
                                                 "texts in fp32 and report the agreement (0: off)")] = 200,
    overwrite: Annotated[bool, typer.Option(help="replace --output if it exists")] = False,
):
    """Predict labels with calibrated probabilities for texts or a file of texts."""
    import time

    from potluck.data import check_writable_format, fresh_names, read_records, read_texts, write_rows
    from potluck.inference import Predictor

    if format not in ("table", "json"):
        raise UserError(f"unknown --format '{format}'", hint="use 'table' or 'json'")
    if bool(texts) == bool(input):
        raise UserError("give either texts or --input FILE", hint="e.g. potluck predict MODEL \"a text\"")
    if output:  # before the work, not after it
        check_output(output, overwrite=overwrite, folder=False, option="--output")
        check_writable_format(output)
    items = list(texts) if texts else read_texts(input, text_column).texts
    predictor = Predictor.from_folder(model, precision=precision, batch_size=batch_size, backend=backend)
    started = time.perf_counter()
    probs = predictor.predict_proba(items)
    elapsed = time.perf_counter() - started
    labels = predictor.labels
    if input:
        console.print(f"scored {len(items)} texts in {elapsed:.1f} s ({len(items) / max(elapsed, 1e-9):.0f} texts/s, "
                      f"{predictor.precision_used}{', onnx' if predictor.backend == 'onnx' else ''})", highlight=False)
        if fp32_check > 0 and predictor.precision_used != "fp32":
            check = predictor.agreement_with_fp32(items, probs, sample=fp32_check)
            console.print(f"{predictor.precision_used} against fp32 on {check['sample']} of these texts: labels agree "
                          f"on {100 * check['agreement']:.1f} %, max |dp| {check['max_abs_dp']:.4f}", highlight=False)
    if output:  # the input's own columns, then ours under names that collide with none of them
        records = read_records(input, text_column) if input else [{"text": t} for t in items]
        ours = ["predicted_label", "predicted_score", *(f"p_{label}" for label in labels)]
        name = fresh_names(ours, {key for record in records for key in record})
        rows = [{**record, name["predicted_label"]: labels[int(p.argmax())], name["predicted_score"]: float(p.max()),
                 **{name[f"p_{label}"]: float(v) for label, v in zip(labels, p, strict=True)}}
                for record, p in zip(records, probs, strict=True)]
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


# -- export -----------------------------------------------------------------------------------------

@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    out: Annotated[Path, typer.Option(help="the folder to write: the model folder again with onnx/model.onnx "
                                           "(may be MODEL itself)")],
    format: Annotated[str, typer.Option("--format", help="'onnx'")] = "onnx",
    int8: Annotated[bool, typer.Option(help="also write onnx/model_qint8.onnx (ONNX Runtime's dynamic int8)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder (or MODEL's onnx/)")] = False,
):
    """Export a model folder for ONNX Runtime; `potluck predict/serve --backend onnx` run it."""
    if format != "onnx":
        raise UserError(f"unknown --format '{format}'", hint="use 'onnx'")
    from potluck.export import export_onnx

    record = export_onnx(model, out, int8=int8, overwrite=overwrite)
    console.print(f"wrote {out / 'onnx' / 'model.onnx'}: probabilities within "
                  f"{record['max_abs_dp_vs_transformers']:.1e} of transformers on {record['checked_on_texts']} texts",
                  highlight=False)
    if int8:
        q = record["int8"]
        console.print(f"wrote {out / 'onnx' / 'model_qint8.onnx'}: labels agree with fp32 on "
                      f"{100 * q['agreement_with_fp32']:.1f} % of those texts, max |dp| {q['max_abs_dp_vs_fp32']:.3f}",
                      highlight=False)


# -- evaluate ---------------------------------------------------------------------------------------

@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    data: Annotated[Path, typer.Option(help="labelled test data")],
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    precision: Annotated[str, typer.Option(help="'auto', 'fp32', 'bf16' or 'int8'")] = "auto",
    report: Annotated[Path | None, typer.Option(help="write index.html with its PNGs and metrics.json into this folder")] = None,
    baseline: Annotated[str | None, typer.Option(help="also fit and score a baseline on the model's own training data: 'tfidf'")] = None,
    baseline_data: Annotated[Path | None, typer.Option(help="the baseline's training data (default: the file in potluck.json)")] = None,
    threshold: Annotated[float, typer.Option(help="two classes: precision/recall when the positive class is called at p >= this")] = 0.5,
    overwrite: Annotated[bool, typer.Option(help="replace the --report folder if it exists and is not empty")] = False,
):
    """Accuracy, macro-F1, ECE, Brier, log-loss and a per-class table; a report with pictures; a baseline."""
    from potluck.classifier import TextClassifier
    from potluck.data import read_data
    from potluck.report import build_report, read_training_log, score_baseline, score_classifier

    if not 0 < threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {threshold}")
    if baseline_data and not baseline:
        raise UserError("--baseline-data needs --baseline", hint="add --baseline tfidf")
    if report:
        check_output(report, overwrite=overwrite, option="--report")
    if baseline:
        from potluck.baseline import make_baseline, model_training_data

        make_baseline(baseline)  # an unknown name fails here, before anything slow
    clf = TextClassifier.load(model, precision=precision)
    test = read_data(data, text_column, label_column)
    runs = [score_classifier(clf, test, threshold=threshold)]
    if baseline:
        fitter = make_baseline(baseline, seed=clf.settings.seed)  # the model's seed: the same validation split
        train, valid, notes = model_training_data(clf, baseline_data)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(f"fitting the {baseline} baseline on the model's {len(train)} training examples "
                      f"(calibrated on its {len(valid)} validation examples)")
        runs.append(score_baseline(fitter.fit(train, valid=valid), test, clf.classes_, threshold=threshold))
    if as_json:
        out.print_json(json.dumps({**runs[0].metrics, **({"baseline": runs[1].metrics} if baseline else {})}))
    else:
        print_metrics(runs[0].metrics, title=f"{model} on {data}", others={r.name: r.metrics for r in runs[1:]})
    if report:
        meta = getattr(clf, "meta_", {})
        about = {"model": str(model), "base": clf.base, "classes": len(clf.classes_),
                 "trained on": f"{clf.data_.get('train_path')} ({clf.data_.get('n_train')} examples)",
                 "fine-tuned": meta.get("created"), "command": meta.get("command")}
        build_report(report, test, runs, classes=clf.classes_, title=f"{model.name} on {data.name}",
                     about=about, training_log=read_training_log(model))
        console.print(f"report written to [bold]{report / 'index.html'}[/]")


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


# -- evaluation reports, baseline, learning curves (owner: evaluation) -------------------------------

@app.command()
@with_settings(FinetuneSettings, "Training (Potluck)")
def curve(
    data: Annotated[Path, typer.Option(help="labelled training data to draw the samples from")],
    test: Annotated[Path, typer.Option(help="labelled test data every point is scored on")],
    sizes: Annotated[str, typer.Option(help="training sizes, comma-separated")] = "100,500,2000",
    seeds: Annotated[int, typer.Option(help="repeats per size (seeds SEED, SEED+1, ...); mean ± std reported")] = 3,
    base: Annotated[str, typer.Option(help="'minilm' (embedded), a model folder, or a hub id")] = "minilm",
    baseline: Annotated[str, typer.Option(help="'tfidf' (TF-IDF + logistic regression) or 'none'")] = "tfidf",
    report: Annotated[Path | None, typer.Option(help="write index.html, learning_curve.png and metrics.json here")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="print the curve as JSON")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the --report folder if it exists and is not empty")] = False,
    **settings,
):
    """Learning curve: test macro-F1 and ECE against the number of labels, Potluck and the baseline."""
    from potluck.curve import learning_curve
    from potluck.data import read_data

    if report:
        check_output(report, overwrite=overwrite, option="--report")

    try:
        size_list = sorted({int(s) for s in sizes.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--sizes {sizes!r} is not a list of whole numbers", hint="e.g. --sizes 100,500,2000") from None
    if not size_list or min(size_list) < 2:
        raise UserError("--sizes needs whole numbers of at least 2", hint="e.g. --sizes 100,500,2000")
    if not 1 <= seeds <= 20:
        raise UserError(f"--seeds must be between 1 and 20, got {seeds}")
    if baseline not in ("tfidf", "none"):
        raise UserError(f"unknown --baseline '{baseline}'", hint="use 'tfidf' or 'none'")
    train_data = read_data(data, text_column, label_column)
    test_data = read_data(test, text_column, label_column)
    models = ["potluck"] + (["tfidf"] if baseline == "tfidf" else [])
    seed_list = [settings["seed"] + i for i in range(seeds)]
    console.print(f"learning curve on {data}: sizes {size_list}, {seeds} seed(s), {' and '.join(models)}; "
                  f"scored on {len(test_data)} test texts")

    def show(point: dict) -> None:
        console.print(f"  {point['size']:>6} examples, seed {point['seed']}: {point['model']:<8} macro-F1 "
                      f"{point['macro_f1']:.4f}  ECE {100 * point['ece']:.2f} %  ({point['fit_seconds']:.0f} s)",
                      highlight=False)

    result = learning_curve(train_data, test_data, size_list, seed_list, base=base,
                            settings=FinetuneSettings(**settings), models=models, on_point=show)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        print_curve(result, title=f"{data.name}: macro-F1 and ECE on {test.name}, mean ± std over {seeds} seed(s)")
    if report:
        from potluck.report import build_curve_report

        about = {"training data": f"{data} ({len(train_data)} examples)", "test data": f"{test} ({len(test_data)})",
                 "base": base, "seeds": ", ".join(map(str, seed_list)),
                 "command": shlex.join(["potluck", *sys.argv[1:]])}
        build_curve_report(report, result, title=f"Learning curve: {data.name}", about=about)
        console.print(f"report written to [bold]{report / 'index.html'}[/]")


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


# -- tokenizer, pretrain, fill (owner: pre-training) ------------------------------------------------

from potluck.pretrain import PretrainSettings  # noqa: E402

CorpusOption = Annotated[list[Path], typer.Option("--corpus", help="text files or folders, JSONL/CSV/TSV/Parquet with a text column (repeat for more)")]
PerFileOption = Annotated[bool, typer.Option(help="each plain-text file is one document (default: each line)")]


@app.command("tokenizer")
def tokenizer_command(
    corpus: CorpusOption,
    out_dir: Annotated[Path, typer.Option("--out", help="the tokenizer folder to write")],
    vocab_size: Annotated[int, typer.Option(help="tokens in the vocabulary, special tokens included")] = 16000,
    cased: Annotated[bool, typer.Option(help="keep upper case and accents (default: lower-case, BERT uncased)")] = False,
    min_frequency: Annotated[int, typer.Option(help="a piece must occur this often to be merged")] = 2,
    text_column: Annotated[str, typer.Option(help="column holding the text in JSONL/CSV/TSV/Parquet")] = "text",
    per_file: PerFileOption = False,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")] = False,
):
    """Train a BERT-style WordPiece tokenizer on a corpus."""
    from potluck.corpus import read_corpus
    from potluck.tokenization import save_tokenizer, train_tokenizer

    if min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {min_frequency}")
    check_output(out_dir, overwrite=overwrite)
    docs = read_corpus(corpus, text_column=text_column, per_file=per_file)
    console.print(f"training a WordPiece tokenizer on {len(docs)} documents ({docs.n_characters()} characters)")
    tok = train_tokenizer(docs.documents, vocab_size, lowercase=not cased, min_frequency=min_frequency)
    save_tokenizer(tok, out_dir, corpus=docs, vocab_size=vocab_size, overwrite=overwrite)
    sample = docs.documents[0][:120]
    console.print(f"{len(tok)} tokens; e.g. {' '.join(tok.tokenize(sample)[:24])}", highlight=False)
    console.print(f"saved [bold]{out_dir}[/]")


@app.command("pretrain")
@with_settings(PretrainSettings, "Pre-training")
def pretrain_command(
    corpus: CorpusOption,
    out_dir: Annotated[Path, typer.Option("--out", help="the encoder folder to write")],
    tokenizer: Annotated[Path | None, typer.Option(help="from scratch: a folder from `potluck tokenizer`")] = None,
    base: Annotated[str | None, typer.Option("--from", help="continue from 'minilm', a model folder or a hub id")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text in JSONL/CSV/TSV/Parquet")] = "text",
    per_file: PerFileOption = False,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint (budgets may be raised)")] = False,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="where checkpoints go (default: OUT.checkpoints)")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep the last checkpoint, to train longer later with --resume")] = False,
    nproc: Annotated[int, typer.Option(help="training processes on this machine (spawns torchrun)")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")] = False,
    **settings,
):
    """Pre-train an encoder by mask filling: from scratch (--tokenizer) or continued (--from)."""
    from potluck import distributed
    from potluck.classifier import remove_checkpoints
    from potluck.corpus import read_corpus
    from potluck.pretrain import check_source, pretrain

    ctx = distributed.context()
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and not ctx.enabled:
        distributed.launch(nproc, without_option(sys.argv[1:], "--nproc"))
        return
    s = PretrainSettings(**settings)
    check_source(tokenizer, base)
    check_output(out_dir, overwrite=overwrite)
    docs = read_corpus(corpus, text_column=text_column, per_file=per_file)
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints")
    what = f"continuing [bold]{base}[/]" if base else f"a new [bold]{s.size}[/] encoder"
    procs = (f" on {ctx.world_size} processes (effective batch {s.batch_size * s.grad_accumulation} blocks)"
             if ctx.enabled else "")
    if ctx.is_main:
        console.print(f"pre-training {what} on {len(docs)} documents ({docs.n_characters()} characters){procs}")
    with PretrainProgress() as progress:
        result = pretrain(docs, out_dir, settings=s, tokenizer=tokenizer, base=base, checkpoint_dir=checkpoint_dir,
                          resume=resume, on_step=progress.update, command=shlex.join(["potluck", *sys.argv[1:]]),
                          overwrite=overwrite)
    if not ctx.is_main:
        return  # rank 0 wrote the folder and reports
    if not keep_checkpoints:
        remove_checkpoints(checkpoint_dir)
    end = result.evals[-1]
    if result.head_only_steps:
        console.print(f"{result.head_only_steps} of the {result.steps} steps trained the new masked-LM head alone; "
                      f"{result.encoder_steps} trained the encoder", highlight=False)
        if result.encoder_steps == 0:
            console.print(f"[yellow]warning:[/] the encoder itself was not trained: raise --max-steps (or the "
                          f"time budget) past --new-head-steps {s.new_head_steps}")
    console.print(f"{result.steps} steps, {result.tokens} tokens in {result.seconds:.0f} s "
                  f"({result.tokens_per_s:.0f} tokens/s, {'bf16' if result.bf16 else 'fp32'}; stopped by "
                  f"{result.stopped_by}); held-out loss {result.evals[0]['loss']:.3f} -> {end['loss']:.3f}, "
                  f"perplexity {end['perplexity']:.1f}, masked-token accuracy {end['accuracy']:.3f}")
    console.print(f"saved [bold]{out_dir}[/]")


class PretrainProgress:
    """A rich progress bar fed by the pre-training loop's on_step callback (the total may shrink under --max-time)."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("step"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f}"),
                                 TextColumn("{task.fields[speed]:.0f} tokens/s"), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.progress.__enter__()
        self.task = None
        return self

    def update(self, event: dict) -> None:
        if event.get("eval"):
            self.progress.console.print(f"step {event['step']}: held-out loss {event['loss']:.4f}, perplexity "
                                        f"{event['perplexity']:.1f}, accuracy {event['accuracy']:.3f}")
            return
        if self.task is None:
            self.task = self.progress.add_task("pretrain", total=event["total_steps"], loss=0.0, speed=0.0)
        self.progress.update(self.task, total=event["total_steps"], completed=event["step"], loss=event["loss"],
                             speed=event["tokens_per_s"])

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


@app.command("fill")
def fill_command(
    model: Annotated[Path, typer.Argument(help="an encoder folder from `potluck pretrain`")],
    texts: Annotated[list[str], typer.Argument(help="texts with [MASK] where a word is missing")],
    top_k: Annotated[int, typer.Option(help="how many words to show per [MASK]")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the answers as JSON")] = False,
):
    """Fill in [MASK]: the top-k words with their probabilities."""
    from potluck.pretrain import fill_mask

    answers = fill_mask(model, list(texts), top_k=top_k)
    if as_json:
        out.print_json(json.dumps(answers))
        return
    for text, masks in zip(texts, answers, strict=True):
        if len(texts) > 1:
            out.print(text, highlight=False)
        for number, candidates in enumerate(masks, start=1):
            if len(masks) > 1:
                out.print(f"[MASK] {number}:", highlight=False)
            width = max(len(c["token"]) for c in candidates)
            for c in candidates:
                out.print(f"{c['token']:<{width}}  {c['score']:.3f}", highlight=False)
# (end of pre-training section)


# -- serve (owner: serving) -------------------------------------------------------------------------

from potluck.serving.settings import ServeSettings  # noqa: E402  (a light module: a dataclass only)


@app.command()
@with_settings(ServeSettings, "Serving")
def serve(
    models: Annotated[list[Path], typer.Argument(help="model folders; each is served at /v1/models/<folder name>/predict")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    api_key_file: Annotated[Path | None, typer.Option(help="bearer tokens, one per line; without it anyone who "
                                                           "can reach the port may use it")] = None,
    **settings,
):
    """Serve model folders over HTTP: TEI-style /predict routes, /info, /metrics, /docs and a web page at /."""
    import uvicorn

    from potluck.serving.app import create_app
    from potluck.serving.auth import KeyRing

    serve_settings = ServeSettings(**settings)
    keys = KeyRing.from_file(api_key_file) if api_key_file else None
    check_port_free(host, port)
    application = create_app(models, serve_settings, keys=keys)
    names = ", ".join(application.state.models)
    if keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key-file: anyone who can reach "
                      "the port can use the models")
    console.print(f"serving [bold]{names}[/] on http://{host}:{port}/  (API docs: /docs; Ctrl+C stops "
                  "after the requests in flight)")
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=serve_settings.graceful_timeout)


def check_port_free(host: str, port: int) -> None:
    """A UserError now, rather than a uvicorn traceback after the models load, if the port is taken."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port", hint="use 1 to 65535, e.g. 8080")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror})",
                        hint="pick another --port, or stop the program using it") from err
# (end of serving section)


# -- fuse (owner: fusion) ---------------------------------------------------------------------------

from potluck.fusion import FusionSettings  # noqa: E402  (dataclasses and safetensors only)


@app.command()
@with_settings(FusionSettings, "Fusion")
def fuse(
    models: Annotated[list[Path], typer.Argument(help="model folders fine-tuned from one base")],
    out_dir: Annotated[Path, typer.Option("--out", help="the fused encoder folder to write")],
    base: Annotated[str | None, typer.Option(
        help="the base they were fine-tuned from (default: the one their potluck.json records)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")] = False,
    **settings,
):
    """Fuse the encoder bodies of fine-tuned models into a new base encoder (heads are never fused)."""
    from potluck.fusion import fuse as fuse_models

    fusion_settings = FusionSettings(**settings)
    check_output(out_dir, overwrite=overwrite)
    result = fuse_models(models, out_dir, base=base, settings=fusion_settings,
                         command=shlex.join(["potluck", *sys.argv[1:]]), overwrite=overwrite)
    table = Table("model", "weight", "‖θ−θ_base‖ / ‖θ_base‖", "head tensors left out", title="inputs")
    for record in result.meta["inputs"]:
        table.add_row(record["path"], f"{record['weight']:.3f}", f"{record['task_vector_norm']:.4f}",
                      str(len(record["heads_left_out"])))
    out.print(table)
    console.print(f"fused {len(models)} models by [bold]{result.method}[/]: {result.n_tensors} tensors "
                  f"from base {result.meta['parent']['base']} "
                  f"({json.dumps(result.meta['parameters'])}) in {result.seconds:.1f} s")
    console.print(f"saved [bold]{out_dir}[/]: fine-tune it as a base with "
                  f"potluck finetune --base {out_dir} --data ... --out ...")
# (end of fuse section)


# -- commons (owner: commons) -----------------------------------------------------------------------

from potluck.commons.round_settings import RoundSettings  # noqa: E402  (a light module: dataclasses only)
from potluck.commons.settings import CommonsSettings  # noqa: E402  (a light module: dataclasses only)

commons_app = typer.Typer(help="The commons: organisations share datasets, lend compute and push weights "
                               "to a shared base encoder.", no_args_is_help=True)
app.add_typer(commons_app, name="commons")

Url = Annotated[str, typer.Argument(help="the commons, e.g. http://127.0.0.1:8700")]
Token = Annotated[str | None, typer.Option(envvar="POTLUCK_TOKEN", show_default=False,
                                           help="your token (default: $POTLUCK_TOKEN)")]
Db = Annotated[str | None, typer.Option(envvar="POTLUCK_COMMONS_DB", show_default=False,
                                        help="a PostgreSQL URL (default: SQLite in the root)")]


def commons_client(url: str, token: str | None):
    from potluck.commons.client import CommonsClient

    return CommonsClient(url, token)


@commons_app.command("init")
def commons_init(
    root: Annotated[Path, typer.Option(help="a new folder for the commons (blobs, and the SQLite database)")],
    base: Annotated[str, typer.Option(help="version 0 of the shared base: 'minilm', an encoder folder or a hub id")] = "minilm",
    db: Db = None,
    admin: Annotated[str, typer.Option(help="the admin's name")] = "admin",
):
    """Create a commons with `--base` as version 0; print the admin token (shown this once)."""
    from potluck.commons.service import Commons

    commons, token = Commons.create(root, base, db, admin)
    base_v0 = commons.registry.current_base()
    console.print(f"created the commons in [bold]{root}[/] ({commons.describe()['database']}); base version 0 "
                  f"from {base}: {len(base_v0.spec)} tensors, weights sha256 {base_v0.weights_sha[:16]}…")
    console.print(f"the token of admin [bold]{admin}[/] (shown once; keep it secret, pass it as --token or "
                  "POTLUCK_TOKEN):")
    out.print(token, highlight=False)


@commons_app.command("serve")
@with_settings(CommonsSettings, "Limits")
def commons_serve(
    root: Annotated[Path, typer.Option(help="the folder made by `potluck commons init`")],
    port: Annotated[int, typer.Option(help="TCP port")] = 8700,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    db: Db = None,
    **settings,
):
    """Serve the commons' HTTP API (/v1; OpenAPI docs at /docs)."""
    import uvicorn

    from potluck.commons.api import create_app
    from potluck.commons.service import Commons

    check_port_free(host, port)
    commons = Commons.open(root, db, CommonsSettings(**settings))
    console.print(f"serving the commons in [bold]{root}[/] ({commons.registry.engine.dialect.name}) on "
                  f"http://{host}:{port}  (API docs: /docs)")
    uvicorn.run(create_app(commons), host=host, port=port, log_level="warning")


@commons_app.command("invite")
def commons_invite(
    url: Url,
    name: Annotated[str, typer.Option(help="the new contributor's name (a-z, 0-9, '-')")],
    role: Annotated[str, typer.Option(help="'contributor', 'reader' or 'admin'")] = "contributor",
    token: Token = None,
):
    """Admin: add a contributor and print its token (shown this once)."""
    with commons_client(url, token) as client:
        who = client.invite(name, role)
    console.print(f"invited [bold]{who['name']}[/] as {who['role']}; its token (shown once):")
    out.print(who["token"], highlight=False)


@commons_app.command("pull")
def commons_pull(
    url: Url,
    out_dir: Annotated[Path, typer.Option("--out", help="the folder to write (a base `potluck finetune --base` takes)")],
    version: Annotated[int | None, typer.Option(help="a base version (default: the current one)")] = None,
    token: Token = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")] = False,
):
    """Download a base encoder as a Hugging Face folder, checking every file's sha256."""
    with commons_client(url, token) as client:
        info = client.pull(out_dir, version, overwrite=overwrite)
    console.print(f"pulled base version {info['version']} ({info['method']}) into [bold]{out_dir}[/]; "
                  f"fine-tune it with: potluck finetune --base {out_dir} --data … --out …")


@commons_app.command("push")
def commons_push(
    url: Url,
    model: Annotated[Path, typer.Option(help="a model folder from `potluck finetune --base <pulled base>`")],
    task: Annotated[str, typer.Option(help="your task's name (created if new; a-z, 0-9, '-')")],
    base_version: Annotated[int | None, typer.Option(help="the base version it was fine-tuned from "
                                                          "(default: recorded in its config.json)")] = None,
    examples: Annotated[int | None, typer.Option(help="examples it was trained on (default: from potluck.json)")] = None,
    token: Token = None,
):
    """Contribute a fine-tuned encoder's weights and head (safetensors only; the data stays home)."""
    with commons_client(url, token) as client:
        record = client.push(model, task, base_version=base_version, n_examples=examples)
    change = record["details"].get("relative_change", 0.0)
    console.print(f"contribution {record['id']} accepted: weights for task [bold]{task}[/] on base version "
                  f"{record['base_version']} ({record['n_examples']} examples, weights moved {change:.2%})")


@commons_app.command("share")
def commons_share(
    url: Url,
    data: Annotated[Path, typer.Option(help="labelled data: .csv, .tsv, .jsonl or .parquet")],
    task: Annotated[str, typer.Option(help="your task's name (created if new; a-z, 0-9, '-')")],
    eval_only: Annotated[bool, typer.Option(help="only for judging new bases, never trained on")] = False,
    eval_fraction: Annotated[float | None, typer.Option(help="share held back for evaluation (default: the commons')")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    token: Token = None,
):
    """Share a labelled dataset the commons may train on (checked like `potluck finetune`'s data)."""
    with commons_client(url, token) as client:
        result = client.share(data, task, text_column=text_column, label_column=label_column,
                              eval_only=eval_only, eval_fraction=eval_fraction)
    c, job = result["contribution"], result["job"]
    kept = f"{c['n_examples']} to train on, {c['n_eval']} held back for evaluation"
    console.print(f"dataset {c['id']} accepted for task [bold]{task}[/]: {kept}"
                  + (f"; queued as job {job['id']}" if job else " (evaluation only)"))


@commons_app.command("work")
@with_settings(FinetuneSettings, "Training")
def commons_work(
    url: Url,
    token: Token = None,
    once: Annotated[bool, typer.Option(help="do at most one job, then stop")] = False,
    max_jobs: Annotated[int | None, typer.Option(help="stop after this many jobs")] = None,
    until_empty: Annotated[bool, typer.Option(help="stop when no job is queued (instead of waiting)")] = False,
    poll: Annotated[float, typer.Option(help="seconds between asks when no job is queued")] = 30.0,
    workdir: Annotated[Path, typer.Option(help="where bases and scratch files go")] = Path(".potluck-worker"),
    **settings,
):
    """Lend compute: lease a job, fine-tune the current base on its data, upload the weights, repeat."""
    from potluck.commons.worker import Worker

    def report(r: dict) -> None:
        extra = f"contribution {r['contribution']}" if r["status"] == "done" else r.get("error", "")
        console.print(f"job {r['job']} ({r['task']}, base {r['base_version']}): {r['status']} {extra}")

    with commons_client(url, token) as client:
        worker = Worker(client, workdir, FinetuneSettings(**settings), poll=poll)
        console.print(f"worker {worker.name} asking {url} for jobs")
        results = worker.run(max_jobs=max_jobs, once=once, until_empty=until_empty, on_result=report)
    console.print(f"{sum(r['status'] == 'done' for r in results)} of {len(results)} job(s) done")


@commons_app.command("round")
@with_settings(RoundSettings, "Round")
def commons_round(url: Url, token: Token = None, **settings):
    """Admin: fuse the unfused accepted weights on the current base into a candidate; promote it only if
    the gate says it is at least as good (runs in the request; the answer says what happened and why)."""
    from potluck.commons.client import CommonsClient

    with CommonsClient(url, token, timeout=24 * 3600.0) as client:
        result = client.round(**RoundSettings(**settings).to_dict())
    if result["outcome"] == "skipped":
        console.print(f"no round: {result['reason']}")
        return
    if not result.get("scores"):  # the gate could not score the candidate
        console.print(f"candidate base version {result['candidate_version']} {result['reason']}")
        return
    scores = Table("task", f"base v{result['parent']}", f"candidate v{result['candidate_version']}", "change",
                   title=f"Round: {len(result['contributions'])} contribution(s) fused by {result['method']}")
    for task, s in result["scores"].items():
        scores.add_row(task, f"{s['current']:.4f}", f"{s['candidate']:.4f}", f"{s['candidate'] - s['current']:+.4f}")
    scores.add_row("mean", f"{result['mean_current']:.4f}", f"{result['mean_candidate']:.4f}",
                   f"{result['mean_candidate'] - result['mean_current']:+.4f}")
    out.print(scores)
    console.print(f"candidate base version {result['candidate_version']} {result['reason']}"
                  + (f"; heads refitted for {', '.join(h['task'] for h in result['heads'])}" if result["heads"] else ""))
    if result.get("released"):
        console.print(f"its {len(result['released'])} contribution(s) were given back for the next round "
                      "(a robust --method such as median can outvote a poisoner)")


@commons_app.command("status")
def commons_status(
    url: Url,
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON")] = False,
):
    """Bases, tasks, contributions, jobs and the leaderboard."""
    with commons_client(url, token) as client:
        status = client.status()
    if as_json:
        out.print_json(json.dumps(status))
        return
    for table in commons_tables(status):
        out.print(table)


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


# (end of commons section)


def main() -> None:
    """The console script: run the app, turning a user's mistake into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except UserError as err:
        from potluck import distributed

        if os.environ.get(distributed.ERROR_DIR):
            distributed.report_error(str(err))  # `--nproc`: the launcher prints it once, for every rank
        else:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
