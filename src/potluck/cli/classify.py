"""potluck finetune | predict | export | evaluate | curve: a classifier from labelled data, and its use."""

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from potluck.cli.options import NprocOption, OverwriteOption, spread_over, with_settings
from potluck.cli.render import StepProgress, console, out, print_curve, print_metrics, print_predictions
from potluck.errors import UserError
from potluck.fileio import check_output
from potluck.finetune import FinetuneSettings

app = typer.Typer()


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
    nproc: NprocOption = 1,
    overwrite: OverwriteOption = False,
    **settings,
):
    """Fine-tune an encoder with a new classification head, then calibrate it."""
    from potluck import distributed
    from potluck.classifier import TextClassifier, remove_checkpoints
    from potluck.data import read_data

    if spread_over(nproc):
        return
    ctx = distributed.context()

    check_output(out_dir, overwrite=overwrite)  # before the training, not after it
    checkpoint_dir = checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints")
    check_output(checkpoint_dir, overwrite=True, option="--checkpoint-dir")
    train_data = read_data(data, text_column, label_column)
    valid_data = read_data(valid, text_column, label_column) if valid else None
    clf = TextClassifier(base, settings=FinetuneSettings(**settings))
    header = (f"fine-tuning [bold]{base}[/] on {len(train_data)} examples from {data} "
              f"({len(set(train_data.labels))} labels)")
    with StepProgress("finetune", header) as progress:
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


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    texts: Annotated[list[str] | None, typer.Argument(help="texts to classify")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", "-i", help="a file of texts (.csv .tsv .jsonl .parquet .txt)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write predictions here (format by suffix)")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text in --input")] = "text",
    output_format: Annotated[str, typer.Option("--format", "-f", help="'table' or 'json' on stdout")] = "table",
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

    from potluck.data import read_texts
    from potluck.inference import Predictor, ranked
    from potluck.tables import check_writable_format, read_records, write_rows

    if output_format not in ("table", "json"):
        raise UserError(f"unknown --format '{output_format}'", hint="use 'table' or 'json'")
    if bool(texts) == bool(input_file):
        raise UserError("give either texts or --input FILE", hint="e.g. potluck predict MODEL \"a text\"")
    if output:  # before the work, not after it
        check_output(output, overwrite=overwrite, folder=False, option="--output")
        check_writable_format(output)
    items = list(texts) if texts else read_texts(input_file, text_column).texts
    predictor = Predictor.from_folder(model, precision=precision, batch_size=batch_size, backend=backend)
    started = time.perf_counter()
    probs = predictor.predict_proba(items)
    elapsed = time.perf_counter() - started
    labels = predictor.labels
    if input_file:
        console.print(f"scored {len(items)} texts in {elapsed:.1f} s ({len(items) / max(elapsed, 1e-9):.0f} texts/s, "
                      f"{predictor.precision_used}{', onnx' if predictor.backend == 'onnx' else ''})", highlight=False)
        if fp32_check > 0 and predictor.precision_used != "fp32":
            check = predictor.agreement_with_fp32(items, probs, sample=fp32_check)
            console.print(f"{predictor.precision_used} against fp32 on {check['sample']} of these texts: labels agree "
                          f"on {100 * check['agreement']:.1f} %, max |dp| {check['max_abs_dp']:.4f}", highlight=False)
    if output:
        rows = prediction_rows(read_records(input_file, text_column) if input_file else [{"text": t} for t in items],
                               probs, labels)
        write_rows(output, rows)
        console.print(f"wrote {len(rows)} predictions to {output}")
        return
    print_predictions(items, ranked(probs, labels, digits=4), output_format)


def prediction_rows(records: list[dict], probs, labels: list[str]) -> list[dict]:
    """The input's own columns, then ours (label, score, a probability per label) under names that collide
    with none of them."""
    from potluck.tables import fresh_names

    name = fresh_names(["predicted_label", "predicted_score", *(f"p_{label}" for label in labels)],
                       {key for record in records for key in record})
    return [{**record, name["predicted_label"]: labels[int(p.argmax())], name["predicted_score"]: float(p.max()),
             **{name[f"p_{label}"]: float(v) for label, v in zip(labels, p, strict=True)}}
            for record, p in zip(records, probs, strict=True)]


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="a model folder from `potluck finetune`")],
    out: Annotated[Path, typer.Option(help="the folder to write: the model folder again with onnx/model.onnx "
                                           "(may be MODEL itself)")],
    export_format: Annotated[str, typer.Option("--format", help="'onnx'")] = "onnx",
    int8: Annotated[bool, typer.Option(help="also write onnx/model_qint8.onnx (ONNX Runtime's dynamic int8)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder (or MODEL's onnx/)")] = False,
):
    """Export a model folder for ONNX Runtime; `potluck predict/serve --backend onnx` run it."""
    if export_format != "onnx":
        raise UserError(f"unknown --format '{export_format}'", hint="use 'onnx'")
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
