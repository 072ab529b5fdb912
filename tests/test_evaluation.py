"""Metrics agree with scikit-learn on fixed predictions; the tables a report is built from."""

import numpy as np
import pytest
from sklearn import metrics as skm

from potluck.calibration import expected_calibration_error
from potluck.evaluation import (
    aggregate,
    align_columns,
    classification_metrics,
    confident_mistakes,
    default_positive,
    mean_std,
    reliability_bins,
    worst_confusions,
)


def fixed_predictions(n=300, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_multiclass_metrics_match_scikit_learn():
    y, probs = fixed_predictions()
    classes = ["a", "b", "c"]
    m = classification_metrics(y, probs, classes)
    pred = probs.argmax(axis=1)
    assert m["n"] == 300
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean())
    assert m["ece"] == pytest.approx(expected_calibration_error(probs, y))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred)
    for i, c in enumerate(classes):
        assert m["per_class"][c] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert "roc_auc" not in m and "at_threshold" not in m


def test_binary_metrics_match_scikit_learn_at_a_threshold():
    y, probs = fixed_predictions(classes=2, seed=1)
    m = classification_metrics(y, probs, ["ham", "spam"], threshold=0.7)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, probs[:, 1]))
    called = (probs[:, 1] >= 0.7).astype(int)
    t = m["at_threshold"]
    assert t["positive"] == "spam" and t["threshold"] == 0.7
    assert t["precision"] == pytest.approx(skm.precision_score(y, called))
    assert t["recall"] == pytest.approx(skm.recall_score(y, called))
    other = classification_metrics(y, probs, ["ham", "spam"], positive="ham")
    assert other["at_threshold"]["positive"] == "ham"
    assert other["roc_auc"] == pytest.approx(skm.roc_auc_score(1 - y, probs[:, 0]))


def test_keys_the_classifier_relies_on_stay():
    y, probs = fixed_predictions()
    m = classification_metrics(list(y), probs.astype(np.float32), ["a", "b", "c"])
    assert {"n", "accuracy", "macro_f1", "ece", "per_class", "brier", "log_loss"} <= set(m)


def test_default_positive_class():
    assert default_positive(["ham", "spam"]) == 1
    assert default_positive(["positive", "negative"]) == 0
    assert default_positive(["objective", "subjective"]) == 1
    assert default_positive(["x", "y"]) == 1


def test_worst_confusions_and_confident_mistakes():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[.9, .1, 0], [.2, .8, 0], [.4, .6, 0], [0, 1, 0], [.05, .05, .9], [0, 0, 1]])
    worst = worst_confusions(y, probs.argmax(axis=1), classes)
    assert worst[0] == {"true": "a", "predicted": "b", "count": 2, "share_of_true": pytest.approx(2 / 3)}
    assert worst[1]["true"] == "b" and worst[1]["predicted"] == "c" and len(worst) == 2
    texts = [f"t{i}" for i in range(6)]
    mistakes = confident_mistakes(texts, y, probs, classes, k=2)
    assert [m["text"] for m in mistakes] == ["t4", "t1"]
    assert mistakes[0]["probability"] == pytest.approx(0.9) and mistakes[0]["p_true"] == pytest.approx(0.05)


def test_reliability_bins_reproduce_the_ece():
    y, probs = fixed_predictions(n=500)
    bins = reliability_bins(probs, y)
    count = np.array(bins["count"])
    assert count.sum() == 500 and len(bins["edges"]) == 16
    gap = np.abs(np.array(bins["accuracy"]) - np.array(bins["confidence"]))
    assert (count / 500 * gap).sum() == pytest.approx(expected_calibration_error(probs, y))


def test_mean_std_and_aggregate():
    assert mean_std([0.8, 0.9, 1.0]) == {"mean": pytest.approx(0.9), "std": pytest.approx(0.1), "n": 3,
                                         "values": [0.8, 0.9, 1.0]}
    assert mean_std([0.5])["std"] == 0.0
    summary = aggregate([{"accuracy": 0.5, "ece": 0.1}, {"accuracy": 0.7, "ece": 0.3}], keys=("accuracy", "ece"))
    assert summary["accuracy"]["mean"] == pytest.approx(0.6) and summary["ece"]["n"] == 2


def test_align_columns():
    probs = np.array([[0.2, 0.8]])
    out = align_columns(probs, ["b", "a"], ["a", "b", "c"])
    np.testing.assert_allclose(out, [[0.8, 0.2, 0.0]])
