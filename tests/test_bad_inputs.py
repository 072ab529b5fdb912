"""The bad-input suite: every case is a mistake a user makes on the command line — a file, an option,
a model folder, a request — and each must end with exit code 2, exactly one line on stderr that names
what is wrong (and where, for files), no traceback, nothing on stdout, and nothing changed outside the
output path it names. The commands run in-process (potluck.cli.main with sys.argv set) so that 60+
cases take seconds, not a torch import each; tests/test_cli.py runs the real subprocess for a few.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import toy_texts
from serving_helpers import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_encoder):
    """A folder with good and bad inputs; every case runs against it and must leave it as it was."""
    from potluck.tables import write_rows

    root = tmp_path_factory.mktemp("bad-inputs")
    texts, labels = toy_texts(60)
    write_rows(root / "train.csv", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    write_rows(root / "test.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    files = {
        "empty.csv": "", "header.csv": "text,label\n", "one-class.csv": "text,label\na,x\nb,x\n",
        "no-label.csv": "text\nhello\n", "empty-text.csv": 'text,label\n"",a\nhi,b\n',
        "fields.csv": "text,label\na,x,extra\n", "quote.csv": 'text,label\n"never closed,x\n',
        "bad.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "list.jsonl": "[1, 2]\n",
        "number.jsonl": '{"text": 5, "label": "x"}\n', "sheet.xlsx": "x", "notes.txt": "one\ntwo\n",
        "keys.txt": "", "corpus.txt": "the server is down\n" * 30, "unseen.jsonl": '{"text": "a", "label": "zebra"}\n',
        "a-file": "precious",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    (root / "utf16.csv").write_bytes("text,label\na,x\n".encode("utf-16"))
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("keep")
    (root / "empty-folder").mkdir()
    model = root / "model"
    shutil.copytree(tiny_model(tmp_path_factory, tiny_encoder), model)
    for name, damage in BROKEN.items():
        shutil.copytree(model, root / name)
        damage(root / name)
    shutil.copytree(tiny_encoder, root / "encoder")
    return root


def _drop_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["classifier.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _drop_body_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.0.output.dense.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _nan(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _config(change):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


BROKEN = {
    "m-missing-tensor": _drop_tensor,
    "m-missing-body": _drop_body_tensor,
    "m-nan": _nan,
    "m-no-tokenizer": lambda f: (f / "tokenizer.json").unlink(),
    "m-pickle": lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 200),
    "m-truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
    "m-bad-json": lambda f: (f / "config.json").write_text("{not json"),
    "m-more-layers": _config(lambda c: c.update(num_hidden_layers=4)),
    "m-wider": _config(lambda c: c.update(hidden_size=64)),
    "m-no-config": lambda f: (f / "config.json").unlink(),
    "m-only-bin": lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
}

M = "{root}/model"
FT = ["finetune", "--data", "{root}/train.csv", "--out", "{root}/new-model", "--epochs", "1"]
CASES = [
    # -- data files ---------------------------------------------------------------------------------------
    ("missing data file", ["finetune", "--data", "{root}/nope.csv", "--out", "{root}/x"], ["nope.csv", "no such file"]),
    ("data is a folder", ["finetune", "--data", "{root}/full", "--out", "{root}/x"], ["folder, not a file"]),
    ("unsupported suffix", ["finetune", "--data", "{root}/sheet.xlsx", "--out", "{root}/x"], ["'.xlsx'"]),
    ("txt for training", ["finetune", "--data", "{root}/notes.txt", "--out", "{root}/x"], [".txt", "labels"]),
    ("empty file", ["finetune", "--data", "{root}/empty.csv", "--out", "{root}/x"], ["empty.csv", "empty"]),
    ("header only", ["finetune", "--data", "{root}/header.csv", "--out", "{root}/x"], ["header.csv", "no examples"]),
    ("one class", ["finetune", "--data", "{root}/one-class.csv", "--out", "{root}/x"], ["one class"]),
    ("no label column", ["finetune", "--data", "{root}/no-label.csv", "--out", "{root}/x"], ["no-label.csv", "label"]),
    ("wrong text column", [*FT, "--text-column", "body"], ["train.csv", "'body'"]),
    ("empty text", ["finetune", "--data", "{root}/empty-text.csv", "--out", "{root}/x"], ["empty-text.csv:2", "empty"]),
    ("extra field", ["finetune", "--data", "{root}/fields.csv", "--out", "{root}/x"], ["fields.csv:2", "3 fields"]),
    ("unclosed quote", ["finetune", "--data", "{root}/quote.csv", "--out", "{root}/x"], ["quote.csv:2", "quote"]),
    ("bad JSON line", ["finetune", "--data", "{root}/bad.jsonl", "--out", "{root}/x"], ["bad.jsonl:2", "JSON"]),
    ("JSON not an object", ["finetune", "--data", "{root}/list.jsonl", "--out", "{root}/x"], ["list.jsonl:1", "object"]),
    ("number as text", ["finetune", "--data", "{root}/number.jsonl", "--out", "{root}/x"], ["number.jsonl:1"]),
    ("latin-1 bytes", ["finetune", "--data", "{root}/latin1.csv", "--out", "{root}/x"], ["latin1.csv:2", "UTF-8"]),
    ("UTF-16 file", ["finetune", "--data", "{root}/utf16.csv", "--out", "{root}/x"], ["utf16.csv", "UTF-16"]),
    ("unseen validation label", [*FT, "--valid", "{root}/unseen.jsonl"], ["unseen.jsonl:1", "'zebra'"]),
    # -- training options ---------------------------------------------------------------------------------
    ("epochs 0", [*FT, "--epochs", "0"], ["epochs must be at least 1"]),
    ("batch size 0", [*FT, "--batch-size", "0"], ["batch_size must be at least 1"]),
    ("negative learning rate", [*FT, "--learning-rate", "-1"], ["learning_rate must be positive"]),
    ("warm-up 1.5", [*FT, "--warmup-ratio", "1.5"], ["warmup_ratio"]),
    ("max length 4", [*FT, "--max-length", "4"], ["max_length"]),
    ("max length past the positions", [*FT, "--base", "{root}/encoder", "--max-length", "1024"],
     ["max_length 1024", "256 positions"]),
    ("validation fraction 0.7", [*FT, "--valid-fraction", "0.7"], ["valid_fraction"]),
    ("class weights", [*FT, "--class-weights", "heavy"], ["class_weights"]),
    ("training precision int8", [*FT, "--precision", "int8"], ["precision must be"]),
    ("device tpu", [*FT, "--device", "tpu"], ["device must be"]),
    ("nproc 0", [*FT, "--nproc", "0"], ["--nproc must be at least 1"]),
    ("missing base folder", [*FT, "--base", "./no-such-encoder"], ["no such base folder"]),
    ("base not a model folder", [*FT, "--base", "{root}/full"], ["not a Hugging Face model folder"]),
    ("broken base", [*FT, "--base", "{root}/m-nan"], ["non-finite"]),
    ("--out is a file", ["finetune", "--data", "{root}/train.csv", "--out", "{root}/a-file"], ["is a file, not a folder"]),
    ("--out not empty", ["finetune", "--data", "{root}/train.csv", "--out", "{root}/full"], ["not empty", "--overwrite"]),
    ("checkpoint dir is a file", [*FT, "--checkpoint-dir", "{root}/a-file"], ["--checkpoint-dir", "is a file"]),
    # -- model folders --------------------------------------------------------------------------------------
    ("no model folder", ["predict", "{root}/nowhere", "hi"], ["no such model folder"]),
    ("not a model folder", ["predict", "{root}/full", "hi"], ["not a model folder"]),
    ("missing tensor", ["predict", "{root}/m-missing-tensor", "hi"], ["classifier.bias is missing"]),
    ("NaN weights", ["predict", "{root}/m-nan", "hi"], ["non-finite"]),
    ("no tokenizer", ["predict", "{root}/m-no-tokenizer", "hi"], ["no tokenizer"]),
    ("pickle renamed", ["predict", "{root}/m-pickle", "hi"], ["not a readable safetensors file"]),
    ("truncated weights", ["predict", "{root}/m-truncated", "hi"], ["not a readable safetensors file"]),
    ("bad config JSON", ["evaluate", "{root}/m-bad-json", "--data", "{root}/test.jsonl"], ["config.json:1:2", "JSON"]),
    ("config with more layers", ["predict", "{root}/m-more-layers", "hi"], ["is missing"]),
    ("config of another width", ["predict", "{root}/m-wider", "hi"], ["has shape"]),
    ("no config", ["serve", "{root}/m-no-config", "--port", "18999"], ["no config.json"]),
    ("only a pickle", ["predict", "{root}/m-only-bin", "hi"], ["pytorch_model.bin", "never loads"]),
    ("broken fine-tune base", [*FT, "--base", "{root}/m-missing-body"], ["lacks tensor", "layer.0.output.dense"]),
    # -- predict and evaluate options ---------------------------------------------------------------------------
    ("no texts", ["predict", M], ["give either texts or --input"]),
    ("texts and a file", ["predict", M, "hi", "--input", "{root}/notes.txt"], ["give either texts or --input"]),
    ("format xml", ["predict", M, "hi", "--format", "xml"], ["unknown --format 'xml'"]),
    ("precision fp16", ["predict", M, "hi", "--precision", "fp16"], ["unknown precision 'fp16'"]),
    ("backend tensorrt", ["predict", M, "hi", "--backend", "tensorrt"], ["unknown backend"]),
    ("onnx backend without an export", ["predict", M, "hi", "--backend", "onnx"], ["has no onnx/model.onnx"]),
    ("missing input file", ["predict", M, "--input", "{root}/nope.jsonl"], ["nope.jsonl", "no such file"]),
    ("output exists", ["predict", M, "--input", "{root}/notes.txt", "--output", "{root}/test.jsonl"],
     ["--output", "already exists"]),
    ("output suffix", ["predict", M, "--input", "{root}/notes.txt", "--output", "{root}/out.xlsx"], ["'.xlsx'"]),
    ("threshold 2", ["evaluate", M, "--data", "{root}/test.jsonl", "--threshold", "2"], ["--threshold"]),
    ("unknown baseline", ["evaluate", M, "--data", "{root}/test.jsonl", "--baseline", "bm25"], ["bm25"]),
    ("baseline data without baseline", ["evaluate", M, "--data", "{root}/test.jsonl", "--baseline-data",
                                        "{root}/train.csv"], ["--baseline-data needs --baseline"]),
    ("report is a file", ["evaluate", M, "--data", "{root}/test.jsonl", "--report", "{root}/a-file"],
     ["--report", "is a file"]),
    ("unseen test label", ["evaluate", M, "--data", "{root}/unseen.jsonl"], ["unseen.jsonl", "'zebra'"]),
    # -- other commands ---------------------------------------------------------------------------------------
    ("export format", ["export", M, "--format", "tflite", "--out", "{root}/x"], ["unknown --format 'tflite'"]),
    ("export over a folder", ["export", M, "--out", "{root}/full"], ["not empty"]),
    ("tokenizer min frequency", ["tokenizer", "--corpus", "{root}/corpus.txt", "--out", "{root}/tok",
                                 "--min-frequency", "-1"], ["--min-frequency must be at least 1"]),
    ("tokenizer over a file", ["tokenizer", "--corpus", "{root}/corpus.txt", "--out", "{root}/a-file"], ["is a file"]),
    ("missing corpus", ["tokenizer", "--corpus", "{root}/nope.txt", "--out", "{root}/tok"], ["nope.txt"]),
    ("pretrain without a source", ["pretrain", "--corpus", "{root}/corpus.txt", "--out", "{root}/enc"],
     ["--tokenizer", "--from"]),
    ("pretrain over a folder", ["pretrain", "--corpus", "{root}/corpus.txt", "--from", "{root}/encoder",
                                "--out", "{root}/full"], ["not empty"]),
    ("fill with an encoder that has no MLM head", ["fill", "{root}/encoder", "the [MASK] is down"],
     ["no masked-LM head"]),
    ("serve on port 99999", ["serve", M, "--port", "99999"], ["--port 99999 is not a TCP port"]),
    ("serve a missing folder", ["serve", "{root}/nowhere", "--port", "18998"], ["no such model folder"]),
    ("serve with a missing key file", ["serve", M, "--port", "18997", "--api-key-file", "{root}/nokeys.txt"],
     ["nokeys.txt"]),
    ("serve with an empty key file", ["serve", M, "--port", "18996", "--api-key-file", "{root}/keys.txt"],
     ["keys.txt"]),
    ("fuse into its input", ["fuse", M, "--out", M], ["--out"]),
    ("fuse a pickle renamed", ["fuse", M, "{root}/m-pickle", "--base", "{root}/encoder", "--out", "{root}/fused"],
     ["m-pickle", "safetensors"]),
    ("fuse a truncated file", ["fuse", M, "{root}/m-truncated", "--base", "{root}/encoder", "--out", "{root}/fused"],
     ["m-truncated", "safetensors"]),
    ("fuse a bad config", ["fuse", M, "{root}/m-bad-json", "--base", "{root}/encoder", "--out", "{root}/fused"],
     ["m-bad-json"]),
    ("commons pull over a file", ["commons", "pull", "http://127.0.0.1:9", "--out", "{root}/a-file", "--token", "t"],
     ["is a file"]),
    ("commons push of a pickle", ["commons", "push", "http://127.0.0.1:9", "--model", "{root}/m-pickle", "--task", "t",
                                  "--base-version", "0", "--token", "t"], ["m-pickle", "safetensors"]),
    ("commons push of NaN weights", ["commons", "push", "http://127.0.0.1:9", "--model", "{root}/m-nan", "--task", "t",
                                     "--base-version", "0", "--token", "t"], ["non-finite"]),
    ("commons push of a bad config", ["commons", "push", "http://127.0.0.1:9", "--model", "{root}/m-bad-json",
                                      "--task", "t", "--base-version", "0", "--token", "t"], ["config.json:1:2"]),
    ("curve sizes", ["curve", "--data", "{root}/train.csv", "--test", "{root}/test.jsonl", "--sizes", "a,b"],
     ["--sizes"]),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (but the build of the models) with the sha256 of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    from potluck import cli

    saved = sys.argv
    sys.argv = ["potluck", *argv]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(sandbox, capsys, name, argv, needles):
    argv = [a.format(root=sandbox) for a in argv]
    before = snapshot(sandbox)
    code, out, err = run_in_process(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {err}{out}"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert out == "", out
    for needle in needles:
        assert needle.format(root=sandbox) in lines[0], lines[0]
    assert snapshot(sandbox) == before, "a file outside the output path changed"
