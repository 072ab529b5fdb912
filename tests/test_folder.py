"""Broken model folders are refused on load with one line naming the folder, the file and what is
wrong — never answered from (issue: a missing tensor initialised at random, a default tokenizer, NaN)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import toy_texts
from safetensors.torch import load_file, save_file
from serving_helpers import tiny_model

from potluck.errors import NonFiniteOutput, UserError
from potluck.inference import Predictor


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_encoder):
    return tiny_model(tmp_path_factory, tiny_encoder)


def edit_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(t):
    del t["bert.encoder.layer.1.output.dense.weight"]


def nan_tensor(t):
    t["bert.encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")


def extra_tensor(t):
    t["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(3, 3)


def head_rows(t):
    t["classifier.weight"] = torch.zeros(3, t["classifier.weight"].shape[1])
    t["classifier.bias"] = torch.zeros(3)


def pickle_renamed(folder):
    torch.save({"a": torch.zeros(2)}, folder / "model.safetensors")


def truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def only_a_pickle(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def foreign_tokenizer(folder):
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz-extra"] = 10_000
    (folder / "tokenizer.json").write_text(json.dumps(spec))


CASES = {
    "missing tensor": (lambda f: edit_weights(f, drop_tensor), "tensor bert.encoder.layer.1.output.dense.weight is missing"),
    "NaN weights": (lambda f: edit_weights(f, nan_tensor), "holds 1 non-finite values"),
    "unused tensor": (lambda f: edit_weights(f, extra_tensor), "is not part of the model config.json describes"),
    "more layers in config": (lambda f: edit_config(f, lambda c: c.update(num_hidden_layers=8)), "is missing"),
    "fewer layers in config": (lambda f: edit_config(f, lambda c: c.update(num_hidden_layers=1)), "is not part of"),
    "wrong shapes in config": (lambda f: edit_config(f, lambda c: c.update(intermediate_size=40)), "has shape"),
    "config missing a field": (lambda f: edit_config(f, lambda c: c.pop("hidden_size")), "'hidden_size' is missing"),
    "head rows != labels": (lambda f: edit_weights(f, head_rows), "id2label names 2 labels but the head has 3 rows"),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json",)], "has no tokenizer"),
    "tokenizer of another model": (foreign_tokenizer, "token id 10000 is outside the model's"),
    "bad config JSON": (lambda f: (f / "config.json").write_text('{"model_type": "bert",\n  "x": }'),
                        "config.json:2:8: not valid JSON"),
    "pickle renamed": (pickle_renamed, "not a readable safetensors file"),
    "truncated weights": (truncated, "not a readable safetensors file"),
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "not a readable safetensors file"),
    "only a pickle": (only_a_pickle, "has no model.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_folder_is_refused_in_one_line(good, tmp_path, case):
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    break_it, message = CASES[case]
    break_it(folder)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        Predictor.from_folder(folder, precision="fp32")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["missing tensor", "NaN weights", "no tokenizer"])
def test_the_cli_says_it_in_one_line_and_exits_2(good, tmp_path, case):
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    CASES[case][0](folder)
    result = subprocess.run([sys.executable, "-m", "potluck", "predict", str(folder), "server down"],
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(folder) in lines[0] and result.stdout == ""


def test_a_non_finite_output_is_an_error_never_a_number(good, monkeypatch):
    from fastapi.testclient import TestClient

    from potluck.serving.app import create_app
    from potluck.serving.settings import ServeSettings

    predictor = Predictor.from_folder(good, precision="fp32")
    original = predictor.runner.classify
    monkeypatch.setattr(predictor.runner, "classify", lambda rows: original(rows) * float("nan"))
    with pytest.raises(NonFiniteOutput, match="non-finite score"):
        predictor.predict_proba(["server down"])
    app = create_app([good], ServeSettings(precision="fp32", processes=False))
    with TestClient(app) as client:
        runner = next(iter(app.state.models.values())).predictor.runner
        real = runner.classify
        monkeypatch.setattr(runner, "classify", lambda rows: real(rows) * float("nan"))
        answer = client.post("/predict", json={"inputs": "server down"})
        assert answer.status_code == 500 and "non-finite score" in answer.json()["error"]
        assert 'code="500"' in client.get("/metrics").text
    assert np.isfinite(Predictor.from_folder(good, precision="fp32").predict_proba(["server down"])).all()


def test_a_broken_base_is_refused_before_any_training(tiny_encoder, tmp_path):
    """finetune --base and pretrain --from check the encoder they start from (a NaN base once trained a
    whole epoch before failing)."""
    from potluck import TextClassifier
    from potluck.encoders import load_tokenizer
    from potluck.pretrain import PretrainSettings, build_model

    nan_base = tmp_path / "nan-base"
    shutil.copytree(tiny_encoder, nan_base)
    tensors = load_file(nan_base / "model.safetensors")
    name = next(k for k in tensors if k.endswith("attention.self.query.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, nan_base / "model.safetensors", metadata={"format": "pt"})
    texts, labels = toy_texts(40)
    with pytest.raises(UserError, match=f"base '{nan_base}'.*non-finite"):
        TextClassifier(base=nan_base, epochs=1, precision="fp32").fit(texts, labels)
    short_base = tmp_path / "short-base"
    shutil.copytree(tiny_encoder, short_base)
    tensors = load_file(short_base / "model.safetensors")
    del tensors[name]
    save_file(tensors, short_base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks tensor"):
        build_model(load_tokenizer(short_base), PretrainSettings(), base=str(short_base))
