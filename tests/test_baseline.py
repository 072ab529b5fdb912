"""The TF-IDF + logistic-regression baseline, the data it is compared on, and the learning-curve samples."""

from collections import Counter

import numpy as np
import pytest
from helpers import shared_dataset, toy_texts

from potluck.baseline import TfidfBaseline, make_baseline, model_training_data
from potluck.curve import fit_and_score, learning_curve, stratified_sample
from potluck.data import DataError, LabelledData, read_data
from potluck.errors import UserError
from potluck.tables import write_rows


def toy(n=160, seed=0):
    return toy_texts(n, seed=seed)


def test_fit_returns_self_learns_and_calibrates():
    texts, labels = toy()
    base = TfidfBaseline(seed=1)
    assert not hasattr(base, "classes_")
    assert base.fit(texts, labels) is base
    assert base.classes_ == ["calm", "urgent"] and base.C_ in base.settings.c_grid
    test_texts, test_labels = toy(60, seed=7)
    assert np.mean(np.array(base.predict(test_texts)) == np.array(test_labels)) > 0.9
    probs = base.predict_proba(test_texts)
    assert probs.shape == (60, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-9)
    assert base.temperature_ > 0 and {"temperature", "ece_before", "ece_after", "C"} <= set(base.calibration_)
    assert base.data_["n_train"] + base.data_["n_valid"] == 160
    row = base.predict_proba("server down now")
    assert row.shape == (2,) and isinstance(base.predict("server down now"), str)


def test_the_temperature_scales_the_logits():
    texts, labels = toy()
    calibrated = TfidfBaseline().fit(texts, labels)
    raw = TfidfBaseline(calibrate=False).fit(texts, labels)
    assert raw.temperature_ == 1.0
    z = calibrated.logits(texts[:5])
    expected = np.exp(z / calibrated.temperature_)
    np.testing.assert_allclose(calibrated.predict_proba(texts[:5]), expected / expected.sum(axis=1, keepdims=True))


def test_given_validation_data_is_used_and_checked():
    texts, labels = toy()
    valid = LabelledData(*toy(40, seed=3))
    base = TfidfBaseline().fit(LabelledData(texts, labels), valid=valid)
    assert base.data_ == {"n_train": 160, "n_valid": 40, "fingerprint": LabelledData(texts, labels).fingerprint()}
    bad = LabelledData(["hello there"], ["unheard"], "valid.csv", [2])
    with pytest.raises(DataError, match="valid.csv:2.*unheard"):
        TfidfBaseline().fit(texts, labels, valid=bad)


def test_user_mistakes_are_user_errors():
    with pytest.raises(UserError, match="not fitted"):
        TfidfBaseline().predict_proba(["x"])
    with pytest.raises(UserError, match="unknown baseline 'bert'"):
        make_baseline("bert")
    assert isinstance(make_baseline("tfidf", seed=4), TfidfBaseline)


def test_model_training_data_reproduces_the_models_split(tiny_encoder, tmp_path):
    from potluck import TextClassifier

    texts, labels = toy()
    write_rows(tmp_path / "train.csv", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    data = read_data(tmp_path / "train.csv")
    clf = TextClassifier(base=tiny_encoder, epochs=1, precision="fp32", seed=5).fit(data)
    train, valid, notes = model_training_data(clf)
    assert notes == [] and len(train) == clf.data_["n_train"] and len(valid) == clf.data_["n_valid"]
    other = tmp_path / "other.csv"
    write_rows(other, [{"text": t, "label": y} for t, y in zip(*toy(100, seed=9), strict=True)])
    _, _, notes = model_training_data(clf, other)
    assert notes and "fingerprint" in notes[0]
    clf.data_ = {}
    with pytest.raises(UserError, match="--baseline-data"):
        model_training_data(clf)


def test_stratified_sample_keeps_every_class_and_the_proportions():
    labels = ["a"] * 700 + ["b"] * 290 + ["c"] * 9 + ["rare"]
    data = LabelledData([f"text {i}" for i in range(1000)], labels)
    sample = stratified_sample(data, 100, seed=0)
    counts = Counter(sample.labels)
    assert len(sample) == 100 and set(counts) == {"a", "b", "c", "rare"}
    assert 66 <= counts["a"] <= 72 and 26 <= counts["b"] <= 31
    assert stratified_sample(data, 100, seed=0).texts == sample.texts
    assert stratified_sample(data, 100, seed=1).texts != sample.texts
    assert stratified_sample(data, 5000, seed=0) is data
    with pytest.raises(UserError, match="cannot hold all 4 classes"):
        stratified_sample(data, 3, seed=0)


def test_fit_and_score_and_a_curve_with_the_baseline_only():
    texts, labels = toy(200)
    train, test = LabelledData(texts, labels), LabelledData(*toy(60, seed=4))
    scores = fit_and_score(train, test, seed=0, models=["tfidf"])
    assert scores["tfidf"]["macro_f1"] > 0.9 and {"ece", "brier", "fit_seconds"} <= set(scores["tfidf"])
    seen = []
    curve = learning_curve(train, test, [20, 80], [0, 1], models=["tfidf"], on_point=seen.append)
    assert curve["sizes"] == [20, 80] and len(curve["points"]) == len(seen) == 4
    assert curve["summary"]["tfidf"]["80"]["macro_f1"]["n"] == 2
    with pytest.raises(DataError, match="not one of"):
        fit_and_score(train, LabelledData(["x"], ["other"]), seed=0, models=["tfidf"])


@pytest.mark.slow
def test_the_baseline_on_real_sms_spam():
    train = stratified_sample(read_data(shared_dataset("sms_spam")), 1000, seed=0)
    test = read_data(shared_dataset("sms_spam", "test"))
    scores = fit_and_score(train, test, seed=0, models=["tfidf"])["tfidf"]
    assert scores["accuracy"] >= 0.95 and scores["ece"] <= 0.03 and scores["roc_auc"] >= 0.97
