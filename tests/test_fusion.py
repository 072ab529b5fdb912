"""Fusion of encoder bodies: exact arithmetic of every method, robustness to a poisoned contribution,
heads left out, checks that name the file and tensor, streaming memory, and `potluck fuse`."""

import json
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from helpers import make_tiny_encoder, toy_texts
from safetensors.torch import load_file, save_file

from potluck import fusion
from potluck.errors import UserError
from potluck.fusion import FusionSettings, fuse, fuse_tensors, trim_count

T = torch.tensor

# -- exact values on known tensors ----------------------------------------------------------------

X = [T([1.0, -2.0, 3.0, 0.0, 5.0]), T([2.0, -1.0, -3.0, 0.0, 4.0]), T([4.0, 1.0, 6.0, 1.0, -5.0]),
     T([100.0, -100.0, 0.0, 2.0, 3.0])]
X5 = [*X, T([0.0, 0.0, 0.0, 0.0, 0.0])]


def test_mean_equal_and_weighted_exact():
    assert fuse_tensors(X, method="mean").tolist() == [26.75, -25.5, 1.5, 0.75, 1.75]
    # weights 1, 1, 2, 4 (sum 8): (x1 + x2 + 2 x3 + 4 x4) / 8 = (411, -401, 12, 10, 11) / 8
    assert fuse_tensors(X, method="mean", weights=[1, 1, 2, 4]).tolist() == [51.375, -50.125, 1.5, 1.25, 1.375]


def test_median_exact_odd_and_even():
    assert fuse_tensors(X5, method="median").tolist() == [2.0, -1.0, 0.0, 0.0, 3.0]
    # even N: the mean of the two middle values
    assert fuse_tensors(X, method="median").tolist() == [3.0, -1.5, 1.5, 0.5, 3.5]


def test_trimmed_mean_exact():
    # N=5, trim 0.2 -> k=1 per side: the mean of the middle three of each coordinate
    got = fuse_tensors(X5, method="trimmed-mean", trim=0.2)
    torch.testing.assert_close(got, T([7 / 3, -1.0, 1.0, 1 / 3, 7 / 3]))
    assert fuse_tensors(X5, method="trimmed-mean", trim=0.0).tolist() == fuse_tensors(X5, method="mean").tolist()


def test_trim_count():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 5, 8, 10, 11)] == [0, 0, 1, 1, 1, 2, 2, 3]
    assert trim_count(10, 0.0) == 0 and trim_count(10, 0.45) == 4  # at most (N-1)//2: one value is left


def test_ties_exact():
    base = torch.ones(6)
    taus = [T([4.0, -1.0, 2.0, -3.0, 0.5, 1.0]), T([3.0, 2.0, -5.0, 1.0, 0.25, -1.0]),
            T([-6.0, 3.0, 1.0, -2.0, 0.125, 0.5])]
    # density 0.5 keeps the 3 largest |tau| of each: [4,0,2,-3,0,0], [3,2,-5,0,0,0], [-6,3,0,-2,0,0]
    # elected signs (sign of the sum 1, 5, -3, -5, 0, 0): + + - - 0 0
    # disjoint means of the agreeing kept entries: (4+3)/2, (2+3)/2, -5, (-3-2)/2, 0, 0
    merged = fuse_tensors([base + t for t in taus], method="ties", base=base, density=0.5, scale=0.5)
    assert merged.tolist() == [1 + 0.5 * 3.5, 1 + 0.5 * 2.5, 1 - 0.5 * 5, 1 - 0.5 * 2.5, 1.0, 1.0]
    # density 1 keeps everything: coordinate 4 is then the mean of 0.5, 0.25, 0.125 (all positive)
    full = fuse_tensors([base + t for t in taus], method="ties", base=base, density=1.0)
    assert full[4].item() == pytest.approx(1 + (0.5 + 0.25 + 0.125) / 3)
    assert full[0].item() == pytest.approx(1 + 3.5)  # sum 1 > 0: only 4 and 3 agree


def test_bf16_inputs_fused_in_float32():
    xs = [torch.full((4,), 1.0, dtype=torch.bfloat16), torch.full((4,), 1.0 + 2 ** -7, dtype=torch.bfloat16)]
    got = fuse_tensors(xs, method="mean")
    assert got.dtype == torch.float32 and got[0].item() == 1 + 2 ** -8  # not representable in bf16


def test_settings_are_checked():
    with pytest.raises(UserError, match="unknown fusion method"):
        FusionSettings(method="average")
    with pytest.raises(UserError, match="applies to the mean only"):
        FusionSettings(method="median", weights="examples")
    with pytest.raises(UserError, match="trim"):
        FusionSettings(method="trimmed-mean", trim=0.5)


# -- model folders ----------------------------------------------------------------------------------

def state_of(folder):
    """Body tensors of a saved folder in bare-encoder names."""
    return {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()
            if not k.startswith(("classifier.", "cls."))}


def save_variant(base, folder, change, *, kind="classifier", seed=0, meta=None):
    """A 'fine-tuned' model: the base's body changed by `change(name, tensor)`, saved like finetune saves it."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if kind == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    elif kind == "mlm":
        model = AutoModelForMaskedLM.from_pretrained(base)
    else:
        model = BertModel.from_pretrained(base)
    body = model if kind == "bare" else model.bert
    with torch.no_grad():
        for name, param in body.named_parameters():
            param.copy_(change(name, param))
    model.save_pretrained(folder)
    (folder / "potluck.json").write_text(json.dumps(meta if meta is not None else {"base": str(base)}))
    return folder


def noise(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda name, p: p + scale * torch.randn(p.shape, generator=gen)


@pytest.fixture(scope="module")
def honest(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    return [save_variant(tiny_encoder, root / f"h{i}", noise(0.002, i), seed=i,
                         meta={"base": str(tiny_encoder), "name": f"task{i}", "data": {"n_train": 10 * (i + 1)}})
            for i in range(4)]


@pytest.mark.parametrize("method", ["mean", "trimmed-mean", "median", "ties"])
def test_folders_fuse_like_the_tensor_functions(tiny_encoder, honest, tmp_path, method):
    settings = FusionSettings(method=method, working_mib=1)
    result = fuse(honest[:3], tmp_path / "fused", settings=settings)
    got = load_file(tmp_path / "fused" / "model.safetensors")
    base = load_file(tiny_encoder / "model.safetensors")
    inputs = [state_of(h) for h in honest[:3]]
    assert set(got) == set(base)  # bare encoder names, no head, nothing missing
    for name, tensor in got.items():
        expected = fuse_tensors([s[name] for s in inputs], method=method, base=base[name])
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
    assert result.heads_left_out == [2, 2, 2] and result.n_tensors == len(base)
    meta = json.loads((tmp_path / "fused" / "potluck.json").read_text())
    assert meta["method"] == method and len(meta["inputs"]) == 3
    assert all(len(i["sha256"]) == 64 and i["heads_left_out"] == ["classifier.bias", "classifier.weight"]
               for i in meta["inputs"])
    assert meta["parent"]["base"] == str(tiny_encoder)


def test_weights_by_examples(tiny_encoder, honest, tmp_path):
    fuse(honest[:3], tmp_path / "fused", settings=FusionSettings(weights="examples"))
    got = load_file(tmp_path / "fused" / "model.safetensors")
    inputs = [state_of(h) for h in honest[:3]]
    name = "encoder.layer.0.attention.self.query.weight"
    expected = fuse_tensors([s[name] for s in inputs], method="mean", weights=[10, 20, 30])
    torch.testing.assert_close(got[name], expected, rtol=0, atol=0)
    meta = json.loads((tmp_path / "fused" / "potluck.json").read_text())
    assert [round(i["weight"], 4) for i in meta["inputs"]] == [round(1 / 6, 4), round(2 / 6, 4), 0.5]


def test_mixed_naming_and_heads_left_out(tiny_encoder, tmp_path):
    """A classifier (bert.* + classifier.*), an MLM (bert.* + cls.*) and a bare encoder fuse together."""
    folders = [save_variant(tiny_encoder, tmp_path / kind, noise(0.01, i), kind=kind)
               for i, kind in enumerate(["classifier", "mlm", "bare"])]
    result = fuse(folders, tmp_path / "fused", settings=FusionSettings(method="median"))
    got = load_file(tmp_path / "fused" / "model.safetensors")
    assert not any(k.startswith(("bert.", "classifier.", "cls.")) for k in got)
    assert result.heads_left_out[0] == 2 and result.heads_left_out[1] >= 4 and result.heads_left_out[2] == 0
    inputs = [state_of(f) for f in folders]
    name = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(got[name], fuse_tensors([s[name] for s in inputs], method="median"))


# -- a poisoned contribution ------------------------------------------------------------------------

def relative_distance(a: dict, b: dict) -> float:
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in b if b[k].is_floating_point())
    den = sum(float(b[k].float().square().sum()) for k in b if b[k].is_floating_point())
    return (num / den) ** 0.5


@pytest.mark.parametrize("poison", ["scaled", "flipped"])
def test_a_poisoned_contribution_is_outvoted_by_robust_methods(tiny_encoder, honest, tmp_path, poison):
    change = (lambda name, p: p * 100) if poison == "scaled" else (lambda name, p: -p)
    bad = save_variant(tiny_encoder, tmp_path / "bad", change)
    honest_mean = {}
    fuse(honest, tmp_path / "honest-mean")
    honest_mean = load_file(tmp_path / "honest-mean" / "model.safetensors")
    distance = {}
    for method in ("mean", "trimmed-mean", "median"):
        result = fuse([*honest, bad], tmp_path / method, settings=FusionSettings(method=method, trim=0.2))
        distance[method] = relative_distance(load_file(tmp_path / method / "model.safetensors"), honest_mean)
    assert distance["median"] < 0.02 and distance["trimmed-mean"] < 0.02, distance
    assert distance["mean"] > (10 if poison == "scaled" else 0.3), distance
    norms = result.task_vector_norms  # the poisoner stands out in the report
    assert norms[-1] > 20 * max(norms[:-1]), norms


# -- user mistakes ------------------------------------------------------------------------------------

def test_mismatched_shape_names_file_and_tensor(tiny_encoder, honest, tmp_path):
    other = make_tiny_encoder(tmp_path / "wider", hidden=48)
    with pytest.raises(UserError, match=r"wider/model.safetensors: tensor '.+' is F32\[.*48.*\] but the base has"):
        fuse([honest[0], other], tmp_path / "out", base=tiny_encoder)
    assert not (tmp_path / "out").exists()


def test_dtype_missing_tensor_and_nan_are_refused(tiny_encoder, honest, tmp_path):
    state = load_file(honest[0] / "model.safetensors")
    for case, change in {
        "dtype": lambda s: {**s, "bert.encoder.layer.1.output.dense.bias": s["bert.encoder.layer.1.output.dense.bias"].bfloat16()},
        "missing": lambda s: {k: v for k, v in s.items() if k != "bert.encoder.layer.1.output.dense.bias"},
        "nan": lambda s: {**s, "bert.encoder.layer.1.output.dense.bias": torch.full_like(s["bert.encoder.layer.1.output.dense.bias"], float("nan"))},
    }.items():
        folder = tmp_path / case
        folder.mkdir()
        save_file(change(state), folder / "model.safetensors")
        (folder / "config.json").write_text((honest[0] / "config.json").read_text())
        message = {"dtype": "BF16", "missing": "is missing", "nan": "NaN"}[case]
        with pytest.raises(UserError, match=rf"{case}/model.safetensors: tensor '.*layer.1.output.dense.bias'.*{message}"):
            fuse([honest[1], folder], tmp_path / "out", base=tiny_encoder)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_bases_must_agree_and_pickles_are_refused(tiny_encoder, honest, tmp_path):
    stray = save_variant(tiny_encoder, tmp_path / "stray", noise(0.01, 5), meta={"base": "minilm"})
    with pytest.raises(UserError, match="fine-tuned from .* but .*stray"):
        fuse([honest[0], stray], tmp_path / "out")
    unknown = save_variant(tiny_encoder, tmp_path / "unknown", noise(0.01, 6), meta={})
    with pytest.raises(UserError, match="does not record the base"):
        fuse([honest[0], unknown], tmp_path / "out")
    with pytest.raises(UserError, match="is one of the models or the base"):
        fuse([honest[0], honest[1]], honest[1])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="Found pytorch_model.bin: pickles"):
        fuse([honest[0], pickled], tmp_path / "out", base=tiny_encoder)


# -- streaming ----------------------------------------------------------------------------------------

def peak_live_input_bytes(monkeypatch, base, models, out, method):
    """Fuse while counting the bytes of tensors read from disk that are still alive, at their peak."""
    live, peak, read = [0], [0], [0]
    original = fusion.WeightFile.load

    def counting(self, name, rows=None):
        tensor = original(self, name, rows)
        size = tensor.numel() * tensor.element_size()
        live[0] += size
        read[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - size))
        return tensor

    monkeypatch.setattr(fusion.WeightFile, "load", counting)
    fuse(models, out, base=base, settings=FusionSettings(method=method, working_mib=1))
    return peak[0], read[0]


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    base = make_tiny_encoder(root / "base", hidden=128, layers=1)  # largest tensor 256 x 128 floats = 128 KiB
    return base, [save_variant(base, root / f"m{i}", noise(0.01, i), seed=i) for i in range(8)]


@pytest.mark.parametrize("method", ["mean", "median", "ties"])
def test_memory_does_not_grow_with_the_number_of_models(wide_models, tmp_path, monkeypatch, method):
    base, models = wide_models
    largest = max(t.numel() * t.element_size() for t in load_file(base / "model.safetensors").values())
    model_bytes = (base / "model.safetensors").stat().st_size
    peaks = {}
    for n in (2, 8):
        peaks[n], read = peak_live_input_bytes(monkeypatch, base, models[:n], tmp_path / f"out-{n}", method)
        assert read >= n * model_bytes * 0.95  # every model really was read
    # the base tensor plus one input tensor (mean, ties), or row blocks within the 1 MiB budget (median)
    assert peaks[8] <= 2 * largest + (1 << 20) // 4, peaks
    assert peaks[8] <= peaks[2] * 1.25 + 4096, peaks


# -- the command line and the fused folder as a base --------------------------------------------------

def test_cli_fuse_end_to_end_and_the_result_is_a_base(tiny_encoder, honest, tmp_path):
    from transformers import AutoModel

    from potluck import TextClassifier

    out = tmp_path / "fused"
    result = subprocess.run([sys.executable, "-m", "potluck", "fuse", *map(str, honest[:3]), "--out", str(out),
                             "--method", "ties", "--density", "0.3", "--scale", "0.8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ties" in result.stderr + result.stdout
    meta = json.loads((out / "potluck.json").read_text())
    assert meta["parameters"] == {"density": 0.3, "scale": 0.8, "trim_scope": "per tensor"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    texts, labels = toy_texts(80)
    clf = TextClassifier(base=out, epochs=1, batch_size=16, precision="fp32").fit(texts, labels)
    assert clf.predict_proba(texts[:3]).shape == (3, 2)
    np.testing.assert_allclose(clf.predict_proba(texts[:3]).sum(axis=1), 1, atol=1e-5)

    bad = subprocess.run([sys.executable, "-m", "potluck", "fuse", str(honest[0]), str(tmp_path / "nope"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "no such model folder" in lines[0], bad.stderr


def test_a_commons_contribution_file_keeps_its_head_out(tiny_encoder, honest, tmp_path):
    """The commons stores a contribution as one file: body under base names, its task head under `head.`."""
    folder = tmp_path / "contribution"
    folder.mkdir()
    body = state_of(honest[1])
    save_file({**body, "head.classifier.weight": torch.ones(2, 32), "head.classifier.bias": torch.ones(2)},
              folder / "model.safetensors")
    result = fuse([honest[0], folder], tmp_path / "fused", base=tiny_encoder, settings=FusionSettings(method="median"))
    assert result.heads_left_out == [2, 2]
    name = "encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(load_file(tmp_path / "fused" / "model.safetensors")[name],
                               fuse_tensors([state_of(honest[0])[name], body[name]], method="median"))


def test_the_streaming_writer_writes_what_safetensors_reads(tmp_path):
    from potluck.encoder_weights import SafetensorsWriter

    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7).bfloat16(), "c.ids": torch.arange(4),
               "d.scalar": torch.tensor(2.5), "e.empty": torch.zeros(0, 3), "f.half": torch.randn(2, 2).half()}
    names = {v: k for k, v in fusion.FLOAT_DTYPES.items()} | {torch.int64: "I64"}
    specs = [(k, names[v.dtype], list(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt", "by": "potluck"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "by": "potluck"}
    with pytest.raises(ValueError, match="expected"):
        SafetensorsWriter(tmp_path / "y.safetensors", specs, {}).write("b.bias", tensors["b.bias"])
    with pytest.raises(ValueError, match="5 tensors were not written"):
        with SafetensorsWriter(tmp_path / "z.safetensors", specs, {}) as writer:
            writer.write("a.weight", tensors["a.weight"])
