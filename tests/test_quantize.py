"""potluck.quantize: int8 that keeps fastbert's answers — per-row activations, per-channel weights,
SmoothQuant's channel smoothing — against torch's plain dynamic int8 on the inputs that break it."""

import copy

import numpy as np
import pytest
import torch
from test_fastbert import random_bert

from potluck.fastbert import FastBert
from potluck.hardware import real_cpu
from potluck.quantize import Int8Linear, activation_maxima, calibration_texts, quantize_int8

pytestmark = [pytest.mark.skipif(not real_cpu().int8, reason=f"torch's int8 kernels need AVX2: {real_cpu().describe()}"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch.ao quantisation: deprecated


def outlier_inputs(n=256, width=64, seed=0):
    """Rows like a BERT layer's inputs: most channels small, two channels and a few tokens far larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    x[:, [3, 17]] *= 30  # outlier channels
    x[::50] *= 8  # outlier tokens
    return x


def relative_error(got, want):
    return float((got - want).norm() / want.norm())


def test_int8_linear_keeps_the_function_where_plain_dynamic_int8_does_not():
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = outlier_inputs()
    want = linear(x).detach()
    smoothed = Int8Linear(linear, x.abs().amax(0))(x)
    rows_only = Int8Linear(linear, None)(x)
    plain = quantize_dynamic(torch.nn.Sequential(copy.deepcopy(linear)), {torch.nn.Linear}, dtype=torch.qint8)(x)
    assert relative_error(smoothed, want) < 0.02
    assert relative_error(smoothed, want) < relative_error(rows_only, want) < relative_error(plain, want)


def test_quantize_int8_converts_the_encoder_layers_only_and_leaves_the_runner_alone():
    runner = FastBert.from_model(random_bert())
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(5, 120, size=n).tolist(), 3] for n in (3, 20, 40, 7, 90)]
    int8 = quantize_int8(runner, rows)
    assert all(isinstance(getattr(layer, name), Int8Linear) for layer in int8.layers
               for name in ("qkv", "attn_out", "ff_in", "ff_out"))
    assert isinstance(int8.classifier, torch.nn.Linear) and isinstance(int8.pooler, torch.nn.Linear)
    assert isinstance(runner.layers[0].qkv, torch.nn.Linear)  # the fp32 runner is unchanged
    got, want = int8.classify(rows).numpy(), runner.classify(rows).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_activation_maxima_cover_every_linear_and_leave_no_hooks():
    runner = FastBert.from_model(random_bert())
    maxima = activation_maxima(runner, [[2, 5, 6, 3], [2, 9, 3]])
    assert set(maxima) == {(i, n) for i in range(3) for n in ("qkv", "attn_out", "ff_in", "ff_out")}
    assert maxima[(0, "ff_out")].shape == (96,) and bool((maxima[(0, "qkv")] > 0).all())
    assert not any(layer.qkv._forward_pre_hooks for layer in runner.layers)


def test_calibration_texts_are_whole_words_of_the_vocabulary_and_repeatable():
    vocab = ["[PAD]", "[CLS]", "the", "server", "##s", "down", "42", "payment"]
    texts = calibration_texts(vocab, n=5)
    assert texts == calibration_texts(vocab, n=5) and len(texts) == 5
    assert {w for t in texts for w in t.split()} <= {"the", "server", "down", "payment"}
    assert calibration_texts(["##a", "[PAD]"]) == []
