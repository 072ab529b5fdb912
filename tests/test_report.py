"""Reports as a user gets them: `potluck evaluate --report/--baseline` and `potluck curve` on a tiny model;
every picture a valid PNG of sensible size, every picture referenced by the page, every text escaped."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import toy_texts

from potluck.data import LabelledData
from potluck.tables import write_rows

POTLUCK = [sys.executable, "-m", "potluck"]
NASTY = "<script>alert('x')</script> & server down"


def run(*args):
    return subprocess.run([*POTLUCK, *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_png(path, min_side=300, max_side=4000):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path.name, width, height)
    return width, height


def assert_page_shows_every_png(folder):
    page = (folder / "index.html").read_text()
    referenced = set(re.findall(r"<img src='([^']+)'", page))
    pngs = {p.name for p in folder.glob("*.png")}
    assert pngs and referenced == pngs
    for name in pngs:
        assert_png(folder / name)
    return page


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_encoder):
    """A tiny model fine-tuned from train.csv (recorded in its potluck.json), and a test file."""
    from potluck import TextClassifier
    from potluck.data import read_data

    folder = tmp_path_factory.mktemp("report")
    write_rows(folder / "train.csv", [{"text": t, "label": y} for t, y in zip(*toy_texts(160), strict=True)])
    texts, labels = toy_texts(60, seed=5)
    texts[0] = NASTY
    write_rows(folder / "test.csv", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    clf = TextClassifier(base=tiny_encoder, epochs=2, learning_rate=3e-3, precision="fp32", batch_size=8,
                         train_word_embeddings=True)  # a random encoder: its embeddings must learn
    clf.fit(read_data(folder / "train.csv")).save(folder / "model")
    return folder


@pytest.mark.timeout(300)
def test_evaluate_writes_a_report_with_the_baseline(files):
    out = files / "out"
    result = run("evaluate", files / "model", "--data", files / "test.csv", "--report", out, "--baseline", "tfidf")
    assert result.returncode == 0, result.stderr
    assert "TF-IDF + LR" in result.stdout and "Brier" in result.stdout and "index.html" in result.stderr
    assert {p.name for p in out.iterdir()} == {"index.html", "metrics.json", "confusion.png", "reliability.png",
                                               "per_class_f1.png", "training_loss.png"}
    page = assert_page_shows_every_png(out)
    assert NASTY not in page and "&lt;script&gt;" in page
    for heading in ("Summary", "Can I trust its probabilities?", "Where does it go wrong?", "worst confusions"):
        assert heading in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"Potluck", "TF-IDF + LR"}
    potluck = metrics["models"]["Potluck"]
    assert {"accuracy", "macro_f1", "ece", "brier", "log_loss", "roc_auc", "at_threshold", "uncalibrated"} <= set(potluck)
    assert potluck["n"] == 60 and metrics["data"]["n"] == 60
    assert potluck["calibration"]["temperature"] > 0


@pytest.mark.timeout(300)
def test_evaluate_json_carries_the_baseline_and_old_keys(files):
    result = run("evaluate", files / "model", "--data", files / "test.csv", "--json", "--baseline", "tfidf",
                 "--threshold", "0.8")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert {"n", "accuracy", "macro_f1", "ece", "per_class"} <= set(metrics)
    assert metrics["at_threshold"]["threshold"] == 0.8 and metrics["baseline"]["macro_f1"] > 0.9


@pytest.mark.parametrize("args, needle", [
    (["--baseline", "bert"], "unknown baseline 'bert'"),
    (["--baseline-data", "x.csv"], "--baseline-data needs --baseline"),
    (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
])
def test_evaluate_mistakes_are_user_errors(files, args, needle):
    from typer.testing import CliRunner

    from potluck.cli import app
    from potluck.errors import UserError

    result = CliRunner().invoke(app, ["evaluate", str(files / "model"), "--data", str(files / "test.csv"), *args])
    assert isinstance(result.exception, UserError) and needle in str(result.exception)


@pytest.mark.timeout(300)
def test_curve_with_seeds_and_report(files, tiny_encoder):
    out = files / "curve"
    result = run("curve", "--data", files / "train.csv", "--test", files / "test.csv", "--sizes", "40,120",
                 "--seeds", "2", "--base", tiny_encoder, "--epochs", "1", "--precision", "fp32",
                 "--learning-rate", "3e-3", "--report", out)
    assert result.returncode == 0, result.stderr
    assert "Potluck" in result.stdout and "TF-IDF" in result.stdout
    assert_page_shows_every_png(out)
    curve = json.loads((out / "metrics.json").read_text())
    assert curve["sizes"] == [40, 120] and curve["seeds"] == [0, 1]
    assert len(curve["points"]) == 2 * 2 * 2
    assert curve["summary"]["potluck"]["120"]["macro_f1"]["n"] == 2
    bad = run("curve", "--data", files / "train.csv", "--test", files / "test.csv", "--sizes", "10,lots")
    assert bad.returncode == 2 and "--sizes" in bad.stderr and "Traceback" not in bad.stderr


def test_a_77_class_confusion_matrix_renders(tmp_path):
    from potluck.evaluation import normalised_confusion
    from potluck.plots import plot_confusion

    rng = np.random.default_rng(0)
    classes = [f"intent_{i}_with_a_rather_long_name_{i % 7}" for i in range(77)]
    y = rng.integers(0, 77, 2000)
    pred = np.where(rng.random(2000) < 0.8, y, rng.integers(0, 77, 2000))
    _, rates = normalised_confusion(y, pred, 77)
    width, height = assert_png(plot_confusion(rates, classes, tmp_path / "cm.png"), min_side=1000)
    assert abs(width - height) < 0.3 * width


def test_build_report_from_scores_escapes_and_handles_many_classes(tmp_path):
    from potluck.calibration import softmax
    from potluck.report import Scored, build_report

    rng = np.random.default_rng(1)
    classes = [f"class<{i}>" for i in range(30)]
    y = rng.integers(0, 30, 400)
    logits = rng.normal(0, 1, (400, 30))
    logits[np.arange(400), y] += 3
    data = LabelledData([f"text & {i} <b>" for i in range(400)], [classes[i] for i in y], "test.jsonl")
    runs = [Scored("Potluck", softmax(logits), softmax(logits, 0.5)).score(y, classes)]
    report = build_report(tmp_path, data, runs, classes=classes, title="many <classes>")
    page = assert_page_shows_every_png(tmp_path)
    assert "class<3>" not in page and "many &lt;classes&gt;" in page and "<b>" not in page.replace("<b class=", "")
    assert report["models"]["Potluck"]["uncalibrated"]["ece"] > 0
    assert len(report["confident_mistakes"]) == 8 and "training_loss.png" not in report["pictures"]
