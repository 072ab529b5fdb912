"""`potluck export --format onnx` and the ONNX Runtime backend: the same calibrated probabilities as
transformers and fastbert (to 1e-4), in the Python API, the CLI and the server; mistakes are one line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import tiny_model

from potluck.errors import UserError
from potluck.export import export_onnx
from potluck.inference import Predictor
from potluck.serving.app import create_app
from potluck.serving.settings import ServeSettings

TEXTS = ["server down now", "thanks for the great call next week", "payment failed", "",
         "the site is down and customers cannot pay today please help now " * 20, "hello"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_encoder):
    return tiny_model(tmp_path_factory, tiny_encoder)


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "urgency-onnx"
    record = export_onnx(folder, out, int8=True)
    assert record["max_abs_dp_vs_transformers"] < 1e-4
    return out


def test_the_export_is_the_model_folder_with_its_onnx_graph(folder, exported):
    assert {p.name for p in folder.iterdir()} <= {p.name for p in exported.iterdir()}
    assert (exported / "onnx" / "model.onnx").is_file() and (exported / "onnx" / "model_qint8.onnx").is_file()
    record = json.loads((exported / "onnx" / "export.json").read_text())
    assert record["exporter"] == "torch.onnx.export(dynamo=False)" and 0 <= record["int8"]["agreement_with_fp32"] <= 1


def test_onnx_runtime_gives_the_same_probabilities(folder, exported):
    torch_fp32 = Predictor.from_folder(folder, precision="fp32").predict_proba(TEXTS)
    onnx = Predictor.from_folder(exported, precision="fp32", backend="onnx")
    assert onnx.backend == "onnx" and onnx.precision_used == "fp32" and onnx.labels == ["calm", "urgent"]
    np.testing.assert_allclose(onnx.predict_proba(TEXTS), torch_fp32, atol=1e-4)
    np.testing.assert_allclose(onnx.predict_proba(TEXTS[::-1])[::-1], torch_fp32, atol=1e-4)  # caller's order
    check = onnx.agreement_with_fp32(TEXTS, onnx.predict_proba(TEXTS))  # against fastbert, loaded when asked
    assert check["agreement"] == 1.0 and check["max_abs_dp"] < 1e-4


def test_onnx_int8_runs_close_to_fp32(exported):
    int8 = Predictor.from_folder(exported, precision="int8", backend="onnx")
    assert int8.precision_used == "int8" and int8.runner.path.name == "model_qint8.onnx"
    fp32 = Predictor.from_folder(exported, precision="fp32", backend="onnx").predict_proba(TEXTS)
    assert np.abs(int8.predict_proba(TEXTS) - fp32).max() < 0.1


def test_bf16_on_the_onnx_backend_runs_fp32_and_says_so(exported):
    p = Predictor.from_folder(exported, precision="bf16", backend="onnx")
    assert p.precision_used == "fp32" and "ONNX backend runs fp32 or int8" in p.plan.note


def test_export_mistakes_are_user_errors(folder, exported, tmp_path):
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_onnx(folder, exported)
    with pytest.raises(UserError, match="not a model folder"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="has no onnx/model.onnx"):
        Predictor.from_folder(folder, backend="onnx")
    with pytest.raises(UserError, match="unknown backend"):
        Predictor.from_folder(folder, backend="tensorrt")
    fp32_only = tmp_path / "fp32-only"
    export_onnx(folder, fp32_only)
    with pytest.raises(UserError, match="(?i)export it first.*--int8 --overwrite"):
        Predictor.from_folder(fp32_only, precision="int8", backend="onnx")


def test_export_into_the_model_folder_itself(folder, tmp_path):
    import shutil

    own = tmp_path / "own"
    shutil.copytree(folder, own)
    export_onnx(own, own)
    assert (own / "onnx" / "model.onnx").is_file() and (own / "model.safetensors").is_file()
    with pytest.raises(UserError, match="(?i)add --overwrite"):
        export_onnx(own, own)


def test_the_server_runs_the_onnx_backend(folder, exported):
    reference = Predictor.from_folder(folder, precision="fp32").predict_proba(TEXTS[:3])
    for processes in (False, True):
        settings = ServeSettings(precision="fp32", backend="onnx", processes=processes)
        with TestClient(create_app([exported], settings)) as c:
            assert c.get("/info").json()["models"][0]["backend"] == "onnx"
            ranked = c.post("/predict", json={"inputs": TEXTS[:3]}).json()
        for row, answer in zip(reference, ranked, strict=True):
            assert abs(answer[0]["score"] - row.max()) < 1e-4


def test_cli_export_and_predict(folder, tmp_path):
    out = tmp_path / "cli-onnx"
    run = lambda *a: subprocess.run([sys.executable, "-m", "potluck", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    made = run("export", folder, "--format", "onnx", "--out", out)
    assert made.returncode == 0 and "Traceback" not in made.stderr and "of transformers" in made.stderr, made.stderr
    torch_answer = run("predict", folder, "server down now", "--format", "json", "--precision", "fp32")
    onnx_answer = run("predict", out, "server down now", "--format", "json", "--backend", "onnx")
    assert onnx_answer.returncode == 0, onnx_answer.stderr
    a, b = json.loads(torch_answer.stdout)[0], json.loads(onnx_answer.stdout)[0]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=True)) <= 1e-4
    wrong = run("export", folder, "--format", "tflite", "--out", tmp_path / "x")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "unknown --format" in wrong.stderr
