"""The Predictor on a tiny fine-tuned model: caller's order, precisions against fp32, empty input, limits."""

import numpy as np
import pytest
import torch
from helpers import toy_texts
from serving_helpers import tiny_model

from potluck.batching import batched_logits
from potluck.errors import UserError
from potluck.hardware import pretend, real_cpu
from potluck.inference import Predictor

TEXTS = ["server down now", "thanks for the great call next week", "payment failed",
         "hello", "the site is down and customers cannot pay today please help now",
         "love the new feature request", "crash", "outage outage outage breach locked account now today"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_encoder):
    return tiny_model(tmp_path_factory, tiny_encoder)


@pytest.fixture(scope="module")
def fp32(folder):
    return Predictor.from_folder(folder, precision="fp32")


def test_results_come_back_in_the_callers_order(fp32):
    one_by_one = np.stack([fp32.predict_proba([t])[0] for t in TEXTS])
    together = fp32.predict_proba(TEXTS)  # sorted by length inside, padded per batch
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    reversed_ = fp32.predict_proba(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], together, atol=1e-5)
    assert together.shape == (len(TEXTS), 2) and together.dtype == np.float32
    np.testing.assert_allclose(together.sum(axis=1), 1, atol=1e-5)


def test_small_batches_and_token_budgets_give_the_same_answers(folder, fp32):
    small = Predictor.from_folder(folder, precision="fp32", batch_size=3, max_tokens=24)
    np.testing.assert_allclose(small.predict_proba(TEXTS * 3), fp32.predict_proba(TEXTS * 3), atol=1e-5)


def test_worker_threads_give_the_same_answers_and_leave_torch_threads_alone(folder, fp32):
    """Batches run on `workers` threads at once, each on its own share of the cores; the caller's
    torch thread count, and that of threads started later, stay what they were."""
    import threading

    before = torch.get_num_threads()
    texts = TEXTS * 40  # 320 texts: tokenized in parts on the workers too
    one = Predictor.from_folder(folder, precision="fp32", workers=1, batch_size=4)
    two = Predictor.from_folder(folder, precision="fp32", workers=2, batch_size=4)
    np.testing.assert_allclose(two.predict_proba(texts), one.predict_proba(texts), atol=1e-5)
    np.testing.assert_allclose(two.predict_proba(texts), fp32.predict_proba(texts), atol=1e-5)
    assert two.encode(texts) == one.encode(texts)
    threads_seen = set(two.pool.map(lambda _: torch.get_num_threads(), range(8)))
    assert threads_seen == {max(1, before // 2)}
    assert torch.get_num_threads() == before
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]
    with pytest.raises(UserError, match="workers must be at least 1"):
        Predictor.from_folder(folder, workers=-1)


def test_learned_something_and_labels_follow_the_config(fp32):
    assert fp32.labels == ["calm", "urgent"]
    probs = fp32.predict_proba(["server down outage now", "thanks great love nice"])
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0


@pytest.mark.parametrize("precision,max_dp", [("bf16", 0.03), ("int8", 0.05)])
def test_faster_precisions_agree_with_fp32(folder, fp32, precision, max_dp):
    """On this host: bf16 runs where the CPU has native bf16 (else fp32, see the fallback tests), int8 everywhere."""
    texts, _ = toy_texts(200, seed=5)
    other = Predictor.from_folder(folder, precision=precision)
    runs = precision if precision == "int8" or real_cpu().native_bf16 else "fp32"
    assert other.precision_used == runs
    ref, got = fp32.predict_proba(texts), other.predict_proba(texts)
    assert np.abs(got - ref).max() < max_dp
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.99
    # the model we were given stays fp32 (it is what gets saved); the runner is a converted copy
    assert next(other.model.parameters()).dtype == torch.float32
    if runs == "bf16":
        assert next(other.runner.parameters()).dtype == torch.bfloat16
        assert all(layer.packed for layer in other.runner.layers)  # packed for oneDNN


def test_auto_means_bf16_only_where_the_cpu_has_it(folder):
    assert Predictor.from_folder(folder, precision="auto").precision_used == (
        "bf16" if real_cpu().native_bf16 else "fp32")
    with pretend("avx2"):
        assert Predictor.from_folder(folder, precision="auto").precision_used == "fp32"


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32(folder, fp32, caplog):
    """The AVX2 fallback, on any host: bf16 asked, fp32 runs (the same answers), one line says why."""
    import logging

    from potluck import hardware

    hardware._said.clear()
    with pretend("avx2"), caplog.at_level(logging.WARNING):
        p = Predictor.from_folder(folder, precision="bf16")
        Predictor.from_folder(folder, precision="bf16")
    assert p.precision_used == "fp32" and p.runner is p.reference
    assert "running fp32 instead" in p.plan.note
    np.testing.assert_allclose(p.predict_proba(TEXTS), fp32.predict_proba(TEXTS), atol=1e-6)
    assert sum("bf16 asked" in r.getMessage() for r in caplog.records) == 1


def test_bf16_path_logic_where_amx_is_pretended(folder, fp32):
    """The AMX path on any host: a bf16 copy, packed for oneDNN where this CPU can pack bf16 (on an
    AVX2 host the packing fails and the copy runs unpacked: the fallback inside pack())."""
    with pretend("amx"):
        p = Predictor.from_folder(folder, precision="bf16")
    assert p.precision_used == "bf16" and next(p.runner.parameters()).dtype == torch.bfloat16
    assert all(bool(layer.packed) == real_cpu().onednn_bf16 for layer in p.runner.layers)
    got, ref = p.predict_proba(TEXTS), fp32.predict_proba(TEXTS)
    assert np.abs(got - ref).max() < 0.03


def test_empty_input_gives_an_empty_answer(fp32):
    assert fp32.predict_proba([]).shape == (0, 2)
    assert fp32.logits_from_ids([]).shape == (0, 2)


def test_truncation(fp32):
    long_text = "server down " * 200
    assert len(fp32.encode([long_text])[0]) == fp32.max_length
    with pytest.raises(UserError, match="more than this model's max_length"):
        fp32.encode(["ok", long_text], truncate=False)
    assert fp32.predict_proba([long_text]).shape == (1, 2)


def test_user_mistakes_are_one_line(folder, tmp_path):
    with pytest.raises(UserError, match="unknown precision"):
        Predictor.from_folder(folder, precision="fp16")
    with pytest.raises(UserError, match="no such model folder"):
        Predictor.from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        Predictor.from_folder(tmp_path / "empty")


def test_batched_logits_with_autocast_matches_fp32(fp32):
    ids = fp32.encode(TEXTS)
    pad_id = fp32.tokenizer.pad_token_id
    ref = batched_logits(fp32.model, ids, pad_id=pad_id, bf16=False)
    auto = batched_logits(fp32.model, ids, pad_id=pad_id, bf16=True, batch_size=3)
    np.testing.assert_allclose(ref, fp32.logits(TEXTS), atol=1e-5)
    assert np.abs(auto - ref).max() < 0.05
    assert fp32.model.training is False
