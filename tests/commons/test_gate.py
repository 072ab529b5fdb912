"""The evaluation gate: its rule, its scores on a real tiny task, a poisoned fused base rejected, and the
frozen-encoder head that becomes an ordinary classifier folder."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import shared_dataset, toy_texts

from potluck import TextClassifier
from potluck.commons.gate import (
    FrozenHead,
    GateDecision,
    GateSettings,
    TaskData,
    decide,
    linear_layer,
    refit_task_model,
    run_gate,
    score_base,
)
from potluck.data import DataError
from potluck.errors import UserError
from potluck.fusion import FusionSettings, fuse
from potluck.hardware import real_cpu
from potluck.inference import Predictor

FP32 = GateSettings(precision="fp32")


def toy_task(n_train=60, n_eval=200):
    return TaskData(*toy_texts(n_train), *toy_texts(n_eval, seed=7))


def three_class_texts(n, seed=0):
    rng = random.Random(seed)
    vocab = {"urgent": "server down site crash outage payment failed breach".split(),
             "calm": "thanks question feature request great love nice hello".split(),
             "other": "weather cat dog paris london red blue green".split()}
    labels = [list(vocab)[i % 3] for i in range(n)]
    return [" ".join(rng.sample(vocab[y], 4) + ["the", "a"]) for y in labels], labels


# -- the rule -----------------------------------------------------------------------------------------

def test_decide_promotes_only_when_mean_holds_and_no_task_falls_past_the_margin():
    same = decide({"a": 0.8, "b": 0.6}, {"a": 0.8, "b": 0.6}, margin=0.02)
    assert same.promote and same.reason.startswith("promoted")
    lower = decide({"a": 0.79, "b": 0.6}, {"a": 0.8, "b": 0.6}, margin=0.02)
    assert not lower.promote and "below the current base's" in lower.reason
    one_falls = decide({"a": 0.95, "b": 0.55}, {"a": 0.8, "b": 0.6}, margin=0.02)
    assert one_falls.mean_candidate > one_falls.mean_current
    assert not one_falls.promote and "task 'b' falls by 0.0500" in one_falls.reason
    at_margin = decide({"a": 0.83, "b": 0.58}, {"a": 0.8, "b": 0.6}, margin=0.02)
    assert at_margin.promote  # a fall of exactly the margin is allowed
    assert at_margin.scores == {"a": {"candidate": 0.83, "current": 0.8}, "b": {"candidate": 0.58, "current": 0.6}}
    with pytest.raises(ValueError, match="differ"):
        decide({"a": 0.8}, {"b": 0.8})


def test_decision_round_trips_through_json():
    decision = decide({"a": 0.7, "b": 0.9}, {"a": 0.8, "b": 0.6}, margin=0.05, settings={"pooling": "mean"})
    again = GateDecision.from_dict(json.loads(decision.to_json()))
    assert again == decision and again.settings == {"pooling": "mean"}


def test_settings_and_task_data_are_checked(tiny_encoder):
    with pytest.raises(UserError, match="unknown pooling"):
        GateSettings(pooling="max")
    with pytest.raises(UserError, match="no task has evaluation data"):
        score_base(tiny_encoder, {}, FP32)
    task = toy_task()
    with pytest.raises(DataError, match="label 'spam' in the evaluation data"):
        score_base(tiny_encoder, {"t": task._replace(eval_labels=["spam"] * len(task.eval_texts))}, FP32)
    with pytest.raises(DataError, match="only one class"):
        score_base(tiny_encoder, {"t": task._replace(train_labels=["calm"] * len(task.train_texts))}, FP32)


# -- a real tiny task, and a poisoned base --------------------------------------------------------------

def variant(base, folder, change, seed):
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(base)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(change(param))
    model.save_pretrained(folder)
    (folder / "potluck.json").write_text(json.dumps({"base": str(base)}))
    return folder


@pytest.fixture(scope="module")
def fused_bases(tiny_encoder, tmp_path_factory):
    """Four honest contributions (small changes) and one scaled by 100, fused by mean and by median."""
    root = tmp_path_factory.mktemp("gate")
    honest = [variant(tiny_encoder, root / f"h{i}", lambda p: p + 0.002 * torch.randn_like(p), i) for i in range(4)]
    poisoned = variant(tiny_encoder, root / "poison", lambda p: p * 100, 9)
    return {method: fuse([*honest, poisoned], root / method, settings=FusionSettings(method=method)).out
            for method in ("mean", "median")}


def test_the_gate_rejects_a_mean_fused_base_dragged_by_a_poisoner(tiny_encoder, fused_bases):
    tasks = {"toy": toy_task()}
    current = score_base(tiny_encoder, tasks, FP32)
    assert current["toy"] > 0.9  # the honest base separates the classes with a frozen encoder

    poisoned = run_gate(fused_bases["mean"], tiny_encoder, tasks, FP32, current_scores=current)
    assert poisoned.scores["toy"]["candidate"] < current["toy"] - 0.1
    assert not poisoned.promote and poisoned.reason.startswith("rejected")
    assert poisoned.settings["head"].startswith("logistic regression") and poisoned.settings["margin"] == 0.02

    robust = run_gate(fused_bases["median"], tiny_encoder, tasks, FP32, current_scores=current)
    assert robust.promote, robust.reason


def test_the_gate_with_a_short_full_finetune(tiny_encoder, fused_bases):
    settings = GateSettings(precision="fp32", full_finetune_epochs=1)
    decision = run_gate(fused_bases["median"], tiny_encoder, {"toy": toy_task(120)}, settings)
    assert decision.settings["full_finetune_epochs"] == 1 and decision.settings["head"] == "full fine-tune"
    assert 0 <= decision.mean_candidate <= 1 and set(decision.scores) == {"toy"}


# -- the head that becomes a classifier folder -----------------------------------------------------

@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_layer_reproduces_the_regression(n_classes):
    from sklearn.linear_model import LogisticRegression

    from potluck.calibration import softmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5))
    y = np.array(["a", "b", "c"][:n_classes])[np.arange(90) % n_classes]
    regression = LogisticRegression().fit(x, y)
    weight, bias = linear_layer(regression)
    assert weight.shape == (n_classes, 5)
    np.testing.assert_allclose(softmax(x @ weight.T + bias), regression.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_frozen_head_saves_an_ordinary_classifier_folder(tiny_encoder, tmp_path, n_classes):
    texts, labels = toy_texts(200) if n_classes == 2 else three_class_texts(240)
    tests, _ = toy_texts(30, seed=3) if n_classes == 2 else three_class_texts(30, seed=3)
    head = FrozenHead(tiny_encoder, FP32).fit(texts, labels)
    assert head.classes_ == sorted(set(labels)) and head.temperature_ > 0
    folder = head.save(tmp_path / "head")

    meta = json.loads((folder / "potluck.json").read_text())
    assert meta["classes"] == head.classes_ and meta["calibration"]["temperature"] == head.temperature_
    assert meta["head"]["kind"].startswith("logistic regression on the frozen encoder's pooler output")
    expected = head.predict_proba(tests)
    np.testing.assert_allclose(Predictor.from_folder(folder, precision="fp32").predict_proba(tests), expected,
                               atol=1e-5)
    loaded = TextClassifier.load(folder, precision="fp32")
    assert loaded.classes_ == head.classes_
    np.testing.assert_allclose(loaded.predict_proba(tests), expected, atol=1e-5)


def test_refit_task_model_both_budgets(tiny_encoder, tmp_path):
    texts, labels = toy_texts(120)
    frozen = refit_task_model(tiny_encoder, texts, labels, tmp_path / "frozen", settings=FP32)
    finetuned = refit_task_model(tiny_encoder, texts, labels, tmp_path / "finetuned",
                                 settings=GateSettings(precision="fp32", full_finetune_epochs=1))
    for folder in (frozen, finetuned):
        clf = TextClassifier.load(folder, precision="fp32")
        assert clf.classes_ == ["calm", "urgent"] and clf.predict_proba(texts[:4]).shape == (4, 2)
    assert "head" in json.loads((frozen / "potluck.json").read_text())
    assert json.loads((finetuned / "potluck.json").read_text())["settings"]["epochs"] == 1


@pytest.mark.slow
def test_frozen_head_on_minilm_is_useful_and_survives_bf16(tmp_path):
    """The served head on the embedded encoder: it learns, and bf16 inference keeps its probabilities."""
    from potluck.data import read_data

    train, test = read_data(shared_dataset("sms_spam")), read_data(shared_dataset("sms_spam", "test"))
    head = FrozenHead("minilm", GateSettings(precision="fp32")).fit(train.texts[:600], train.labels[:600])
    folder = head.save(tmp_path / "spam")
    texts, labels = test.texts[:300], test.labels[:300]
    metrics = TextClassifier.load(folder, precision="fp32").evaluate(texts, labels)
    assert metrics["macro_f1"] > 0.8, metrics
    fp32 = Predictor.from_folder(folder, precision="fp32").predict_proba(texts)
    faster = Predictor.from_folder(folder, precision="bf16")  # fp32 where the CPU has no native bf16
    assert faster.precision_used == ("bf16" if real_cpu().native_bf16 else "fp32")
    bf16 = faster.predict_proba(texts)
    assert np.abs(fp32 - bf16).max() < 0.05 and (fp32.argmax(1) == bf16.argmax(1)).mean() > 0.99
