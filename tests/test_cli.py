"""The command line as a user runs it: one clear line and exit code 2 for every mistake."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import toy_texts

from potluck.tables import write_rows

POTLUCK = [sys.executable, "-m", "potluck"]


def run(*args, cwd=None):
    return subprocess.run([*POTLUCK, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-data")
    texts, labels = toy_texts(120)
    write_rows(folder / "train.csv", [{"body": t, "urgency": y} for t, y in zip(texts, labels, strict=True)])
    return folder / "train.csv"


@pytest.fixture(scope="module")
def model_dir(train_file, tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-model") / "m"
    result = run("finetune", "--data", train_file, "--text-column", "body", "--label-column", "urgency",
                 "--base", tiny_encoder, "--out", out, "--epochs", "2", "--learning-rate", "3e-3",
                 "--precision", "fp32", "--batch-size", "8", "--train-word-embeddings")  # random encoder
    assert result.returncode == 0, result.stderr
    assert "saved" in result.stderr and "ECE" in result.stderr
    assert not out.with_name("m.checkpoints").exists()
    return out


def test_finetune_predict_evaluate_round_trip(model_dir, train_file, tmp_path):
    meta = json.loads((model_dir / "potluck.json").read_text())
    assert meta["data"]["text_column"] == "body" and "potluck finetune" in meta["command"]
    one = run("predict", model_dir, "server down now")
    assert one.returncode == 0, one.stderr
    rows = [line.split() for line in one.stdout.strip().splitlines()]
    assert {r[0] for r in rows} == {"urgent", "calm"} and abs(sum(float(r[1]) for r in rows) - 1) < 0.02

    as_json = run("predict", model_dir, "server down now", "thanks great", "--format", "json")
    answers = json.loads(as_json.stdout)
    assert len(answers) == 2 and all(len(a) == 2 for a in answers)

    scored = tmp_path / "scored.jsonl"
    batch = run("predict", model_dir, "--input", train_file, "--text-column", "body", "--output", scored)
    assert batch.returncode == 0, batch.stderr
    first = json.loads(scored.read_text().splitlines()[0])
    # the input's own columns stay (body, and its label column 'urgency'); ours are added beside them
    assert {"body", "urgency", "predicted_label", "predicted_score", "p_urgent", "p_calm"} <= set(first)
    assert first["predicted_label"] in ("urgent", "calm") and first["urgency"] in ("urgent", "calm")

    evaluation = run("evaluate", model_dir, "--data", train_file, "--text-column", "body",
                     "--label-column", "urgency", "--json")
    metrics = json.loads(evaluation.stdout)
    assert metrics["accuracy"] > 0.9 and "ece" in metrics and set(metrics["per_class"]) == {"calm", "urgent"}


def test_bf16_on_a_cpu_without_it_runs_fp32_and_says_so_in_one_line(model_dir):
    """The AVX2 fallback as a user meets it (POTLUCK_CPU pretends the CPU kind): one note, the fp32 answers."""
    import os

    env = {**os.environ, "POTLUCK_CPU": "avx2"}
    asked = subprocess.run([*POTLUCK, "predict", str(model_dir), "server down now", "--precision", "bf16"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert asked.returncode == 0 and "Traceback" not in asked.stderr, asked.stderr
    lines = [line for line in asked.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: bf16 asked, running fp32 instead:"), asked.stderr
    assert "avx2" in lines[0]
    assert asked.stdout == run("predict", model_dir, "server down now", "--precision", "fp32").stdout


def test_missing_file(tmp_path):
    assert_one_line_error(run("finetune", "--data", tmp_path / "nope.csv", "--out", tmp_path / "m"),
                          "nope.csv", "no such file")


def test_unknown_format(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    assert_one_line_error(run("finetune", "--data", tmp_path / "data.xlsx", "--out", tmp_path / "m"),
                          "data.xlsx", ".csv")


def test_missing_column(train_file, tmp_path):
    assert_one_line_error(run("finetune", "--data", train_file, "--out", tmp_path / "m"),
                          "train.csv", "text", "body")


def test_empty_text_names_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nhello,a\n,b\nbye,a\n")
    assert_one_line_error(run("finetune", "--data", path, "--out", tmp_path / "m"), "bad.csv:3:1", "empty")


def test_non_text_value_in_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hi", "label": "a"}\n{"text": 42, "label": "b"}\n')
    assert_one_line_error(run("finetune", "--data", path, "--out", tmp_path / "m"), "bad.jsonl:2", "text")


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,a\n".encode("latin-1"))
    assert_one_line_error(run("finetune", "--data", path, "--out", tmp_path / "m"), "latin.csv:2", "UTF-8")


def test_single_class(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\nhello,a\nbye,a\nmore,a\n")
    assert_one_line_error(run("finetune", "--data", path, "--out", tmp_path / "m"), "one.csv", "one class")


def test_unseen_label_in_test(model_dir, tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("body,urgency\nserver down,urgent\nhello there,spam\n")
    assert_one_line_error(run("evaluate", model_dir, "--data", path, "--text-column", "body",
                              "--label-column", "urgency"), "test.csv:3", "spam")


def test_unseen_label_in_validation(train_file, tiny_encoder, tmp_path):
    valid = tmp_path / "valid.csv"
    valid.write_text("body,urgency\nserver down,urgent\nhello there,spam\n")
    assert_one_line_error(run("finetune", "--data", train_file, "--valid", valid, "--text-column", "body",
                              "--label-column", "urgency", "--base", tiny_encoder, "--out", tmp_path / "m"),
                          "valid.csv:3", "spam")


def test_not_a_model_folder(tmp_path):
    assert_one_line_error(run("predict", tmp_path, "hello"), str(tmp_path), "config.json")


def test_bad_base(train_file, tmp_path):
    assert_one_line_error(run("finetune", "--data", train_file, "--text-column", "body", "--label-column",
                              "urgency", "--base", tmp_path / "no-such-base", "--out", tmp_path / "m"),
                          "no-such-base")


def test_bad_setting(train_file, tmp_path):
    assert_one_line_error(run("finetune", "--data", train_file, "--text-column", "body", "--label-column",
                              "urgency", "--class-weights", "heavy", "--out", tmp_path / "m"), "class_weights")


@pytest.mark.timeout(300)
def test_killed_run_resumes_and_finishes(train_file, tiny_encoder, tmp_path):
    """Kill -9 a real `potluck finetune` after its first checkpoint, then `--resume` it to the end."""
    import time

    out = tmp_path / "m"
    args = [*POTLUCK, "finetune", "--data", str(train_file), "--text-column", "body", "--label-column",
            "urgency", "--base", str(tiny_encoder), "--out", str(out), "--epochs", "12", "--patience", "12",
            "--learning-rate", "1e-4", "--precision", "fp32", "--batch-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = Path(str(out) + ".checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("epoch-000[2-9]")):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert list(checkpoints.glob("epoch-*")), "no checkpoint was written before the kill"
    assert not out.exists()
    resumed = subprocess.run([*POTLUCK, "-v", *args[len(POTLUCK):], "--resume"], capture_output=True, text=True, timeout=280)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert (out / "model.safetensors").exists() and not checkpoints.exists()


def test_nothing_the_user_did_not_ask_to_replace_is_replaced(train_file, model_dir, tmp_path):
    """--out, --output and --report refuse an existing non-empty folder or file before any work starts;
    --overwrite replaces it (atomically)."""
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused = run("finetune", "--data", train_file, "--text-column", "body", "--label-column", "urgency",
                  "--out", out, "--epochs", "1")
    assert_one_line_error(refused, f"--out {out} already exists and is not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "x"
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("precious")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the server is down\n" * 50)
    assert_one_line_error(run("tokenizer", "--corpus", corpus, "--out", a_file, "--vocab-size", "60"),
                          "is a file, not a folder")
    assert_one_line_error(run("tokenizer", "--corpus", corpus, "--out", tmp_path / "tok", "--min-frequency", "-1"),
                          "--min-frequency must be at least 1")
    assert_one_line_error(run("predict", model_dir, "--input", train_file, "--text-column", "body", "--output", a_file),
                          "--output", "already exists")
    assert_one_line_error(run("evaluate", model_dir, "--data", train_file, "--text-column", "body",
                              "--label-column", "urgency", "--report", a_file), "is a file, not a folder")
    assert_one_line_error(run("predict", model_dir, "--input", train_file, "--text-column", "body", "--output",
                              a_file, "--overwrite"), "cannot write file type '.txt'")
    assert a_file.read_text() == "precious" and not (tmp_path / "tok").exists()
    scored_file = tmp_path / "scored.jsonl"
    scored_file.write_text("old")
    scored = run("predict", model_dir, "--input", train_file, "--text-column", "body", "--output", scored_file,
                 "--overwrite")
    assert scored.returncode == 0 and scored_file.read_text() != "old", scored.stderr
