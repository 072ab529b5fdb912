"""potluck.fastbert computes what transformers computes: the same logits from the same weights (unpadded
batches of any lengths), the same token ids from the same tokenizer.json, and a folder it does not know
falls back to transformers. `potluck predict` answers without importing transformers or scikit-learn."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from serving_helpers import tiny_model

from potluck.fastbert import FastBert, FastTokenizer, attention_width, round_up, supports
from potluck.inference import Predictor

TEXTS = ["server down now", "Thanks for the GREAT call next week!", "payment failed", "", "hello",
         "the site is down and customers cannot pay today please help now " * 12, "Café crème, naïve résumé",
         "数据 lost at 3:45pm?? refund #1234", "outage\toutage\noutage  breach"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_encoder):
    return tiny_model(tmp_path_factory, tiny_encoder)


def hf_logits(model, tokenizer, texts, max_length=128):
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()


def random_bert(**config):
    """A random BertForSequenceClassification (5 labels, 3 layers) in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    settings = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                    max_position_embeddings=160, num_labels=5) | config
    torch.manual_seed(1)
    return BertForSequenceClassification(BertConfig(**settings)).eval()


@pytest.mark.parametrize("act,pack_below", [("gelu", 0.9), ("gelu", 0.0), ("gelu", 1.01), ("relu", 0.9),
                                            ("gelu_new", 0.9)])
def test_same_logits_as_transformers_for_every_length_mix(act, pack_below):
    """pack_below 0: every batch runs as a padded grid; 1.01: every batch packed; 0.9: the default choice."""
    model = random_bert(hidden_act=act)
    runner = FastBert.from_model(model)
    runner.pack_below = pack_below
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in (0, 1, 7, 30, 3, 158, 64, 12)]
    lengths = [len(r) for r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(runner.classify(rows).numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(runner.classify(rows[3:4]).numpy(), ref[3:4], atol=2e-5)  # alone = in a batch
    same = [r[:12] for r in rows if len(r) >= 12]  # no padding at all: no attention mask
    np.testing.assert_allclose(runner.classify(same).numpy(), model(input_ids=torch.tensor(same)).logits.detach().numpy(),
                               atol=2e-5)


@pytest.mark.parametrize("slack", [0.0, 0.5, 0.8, 1.0])
def test_attention_blocks_of_similar_lengths_change_nothing(slack):
    """A packed batch runs its attention per block of similar lengths (slack 0: one block; 1: a block
    per distinct length): the logits are the same."""
    model = random_bert()
    runner = FastBert.from_model(model)
    runner.pack_below, runner.block_slack = 1.01, slack
    rng = np.random.default_rng(1)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in rng.integers(0, 100, size=17)]
    ref = np.concatenate([model(input_ids=torch.tensor([r])).logits.detach().numpy() for r in rows])
    np.testing.assert_allclose(runner.classify(rows).numpy(), ref, atol=2e-5)


@pytest.mark.parametrize("pack_below,row_step", [(1.01, 0), (1.01, 4), (1.01, 64), (0.0, 16)])
def test_spare_rows_change_nothing(pack_below, row_step):
    """The rows of a batch are rounded up with spare rows at the end (packed or grid): same logits."""
    model = random_bert()
    runner = FastBert.from_model(model)
    runner.pack_below, runner.row_step = pack_below, row_step
    rng = np.random.default_rng(2)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in rng.integers(0, 100, size=9)]
    ref = np.concatenate([model(input_ids=torch.tensor([r])).logits.detach().numpy() for r in rows])
    np.testing.assert_allclose(runner.classify(rows).numpy(), ref, atol=2e-5)


@pytest.mark.parametrize("step", [1, 16, 4])
def test_widened_attention_grids_change_nothing(step):
    """Attention grids widened past the longest text (packed blocks and plain grids): the same logits."""
    model = random_bert()
    rng = np.random.default_rng(3)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in (12, 13, 14, 27, 28, 60, 61)]
    ref = np.concatenate([model(input_ids=torch.tensor([r])).logits.detach().numpy() for r in rows])
    for pack_below in (1.01, 0.0):
        runner = FastBert.from_model(model)
        runner.pack_below, runner.attend_step = pack_below, step
        np.testing.assert_allclose(runner.classify(rows).numpy(), ref, atol=2e-5)
        same = [r[:14] for r in rows]  # equal lengths: a grid with no padding, widened to 16
        np.testing.assert_allclose(runner.classify(same).numpy(),
                                   model(input_ids=torch.tensor(same)).logits.detach().numpy(), atol=2e-5)


def test_loading_skips_random_init_only_while_it_builds(folder):
    """The runner's weights are the folder's, and nn.Linear draws random weights again afterwards."""
    from safetensors.torch import load_file

    runner = FastBert.from_folder(folder)
    saved = load_file(folder / "model.safetensors")
    torch.testing.assert_close(runner.classifier.weight, saved["classifier.weight"])
    torch.testing.assert_close(runner.word.weight, saved["bert.embeddings.word_embeddings.weight"])
    assert torch.nn.Linear(64, 64).weight.abs().sum() > 0


def test_attention_width():
    assert [attention_width(n) for n in (1, 8, 9, 15, 16, 40, 41, 47, 100, 126)] == [1, 8, 16, 16, 16, 40, 48, 48, 100, 128]
    assert attention_width(47, 1) == 47


def test_round_up_keeps_few_shapes_and_little_waste():
    assert [round_up(n, 16) for n in (1, 16, 17, 100, 128, 129, 1000, 1030)] == [1, 16, 17, 100, 128, 136, 1024, 1088]
    assert all(n <= round_up(n, 16) <= n * 17 / 16 for n in range(1, 20_000))
    assert len({round_up(n, 16) for n in range(1, 16_385)}) <= 16 * 11
    assert round_up(1000, 0) == 1000


def test_length_blocks():
    from potluck.fastbert import length_blocks

    assert length_blocks(np.array([100, 90, 80, 79, 40, 40, 3]), 0.8) == [(0, 3), (3, 4), (4, 6), (6, 7)]
    assert length_blocks(np.array([5, 5, 5]), 0.8) == [(0, 3)]
    assert length_blocks(np.array([9, 1]), 0.0) == [(0, 2)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_weights_compute_the_same_function(act, dtype):
    """pack() lays the weights out for oneDNN with bias and activation fused: the same logits as the
    plain layers, in fp32 to float rounding and in bf16 to bf16 rounding."""
    import copy

    from potluck.hardware import real_cpu

    if dtype == "bf16" and not real_cpu().onednn_bf16:
        pytest.skip(f"oneDNN packs bf16 only with AVX512BW/VL/DQ or AVX-NE-CONVERT; this CPU is {real_cpu().describe()}")
    runner = FastBert.from_model(random_bert(hidden_act=act))
    rng = np.random.default_rng(2)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in (0, 9, 40, 41, 17, 120)]
    torch_dtype, atol = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 0.1)}[dtype]
    plain = copy.deepcopy(runner).to(torch_dtype)
    packed = copy.deepcopy(plain).pack(rows=64)
    assert all(layer.packed for layer in packed.layers)
    np.testing.assert_allclose(packed.classify(rows).numpy(), plain.classify(rows).numpy(), atol=atol)
    if dtype == "bf16":
        reference = runner.classify(rows).numpy()
        assert (packed.classify(rows).numpy().argmax(1) == reference.argmax(1)).mean() >= 5 / 6


def test_weights_that_cannot_be_packed_run_unpacked_and_say_so(monkeypatch, caplog):
    """Where oneDNN refuses to pack (bf16 on an AVX2 CPU raises), pack() leaves the plain layers,
    which compute the same function, and says so once in one line."""
    import copy
    import logging

    from potluck import fastbert, hardware

    def refuse(self, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                           "avx512bw, avx512vl and avx512dq\nmore detail")

    monkeypatch.setattr(fastbert._Layer, "pack", refuse)
    hardware._said.clear()
    runner = FastBert.from_model(random_bert())
    rows = [[2, 7, 9, 3], [2, 5, 3]]
    with caplog.at_level(logging.WARNING):
        packed = copy.deepcopy(runner).pack()
        copy.deepcopy(runner).pack()
    assert not any(layer.packed for layer in packed.layers)
    np.testing.assert_allclose(packed.classify(rows).numpy(), runner.classify(rows).numpy(), atol=1e-6)
    said = [r.getMessage() for r in caplog.records if "not packed" in r.getMessage()]
    assert len(said) == 1 and "bf16 path needs" in said[0] and "\n" not in said[0]


def test_same_logits_and_ids_on_a_saved_folder(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    runner, fast = FastBert.from_folder(folder), FastTokenizer.from_folder(folder, 128)
    ids = fast.encode(TEXTS)
    assert ids == tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]
    assert fast.pad_token_id == tokenizer.pad_token_id
    np.testing.assert_allclose(runner.classify(ids).numpy(), hf_logits(model, tokenizer, TEXTS), atol=2e-5)


def test_the_embedded_minilm_tokenizer_gives_transformers_ids():
    from transformers import AutoTokenizer

    from potluck.encoders import resolve_base

    base = resolve_base("minilm")
    hf, fast = AutoTokenizer.from_pretrained(base), FastTokenizer.from_folder(base, 64)
    assert fast.encode(TEXTS) == hf(TEXTS, truncation=True, max_length=64)["input_ids"]
    assert fast.encode(TEXTS, truncate=False) == hf(TEXTS, truncation=False)["input_ids"]


def test_predictor_from_a_folder_needs_no_transformers_and_matches_it(folder):
    lean = Predictor.from_folder(folder, precision="fp32")
    assert isinstance(lean.runner, FastBert) and lean._model is None
    heavy = Predictor(lean.model, lean.tokenizer, precision="fp32")  # loads transformers' model on demand
    np.testing.assert_allclose(lean.predict_proba(TEXTS), softmax_hf(heavy, TEXTS), atol=2e-5)
    assert lean.labels == ["calm", "urgent"]


def softmax_hf(predictor, texts):
    from potluck.calibration import softmax

    return softmax(hf_logits(predictor.model, predictor.tokenizer, texts, predictor.max_length))


def test_a_model_it_does_not_know_runs_on_transformers(folder, tmp_path):
    other = tmp_path / "silu"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    assert not supports({**config, "hidden_act": "silu"}) and supports(config)
    assert not supports({**config, "model_type": "roberta"})
    predictor = Predictor.from_folder(other, precision="fp32")
    assert not isinstance(predictor.runner, FastBert)
    assert predictor.predict_proba(TEXTS).shape == (len(TEXTS), 2)


def test_a_folder_missing_a_tensor_is_refused_not_patched_up(folder, tmp_path):
    """Once left to transformers, which initialised the missing pooler at random (labels flipped between
    runs); now a one-line error names the tensor (tests/test_folder.py has the other broken folders)."""
    from safetensors.torch import load_file, save_file

    from potluck.errors import UserError

    other = tmp_path / "no-pooler"
    shutil.copytree(folder, other)
    tensors = load_file(other / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pooler" not in k}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="tensor bert.pooler.dense.bias is missing"):
        FastBert.from_folder(other)
    assert FastBert.from_folder(folder) is not None


def test_predict_imports_neither_transformers_nor_sklearn(folder):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom potluck.cli import app\n"
            f"r = CliRunner().invoke(app, ['predict', {str(folder)!r}, 'server down now'])\n"
            "assert r.exit_code == 0, r.output\nprint(r.output)\n"
            "print(sorted(m for m in ('transformers', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "urgent" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout
