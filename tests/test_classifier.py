"""TextClassifier on a tiny random encoder: the scikit-learn contract, saving, calibration, resume."""

import json

import numpy as np
import pytest
import torch
from helpers import toy_texts

from potluck import TextClassifier
from potluck.errors import UserError

FAST = dict(epochs=3, batch_size=8, learning_rate=3e-3, precision="fp32", warmup_ratio=0.0,
            train_word_embeddings=True)  # a random encoder has nothing to transfer: its word embeddings must learn too


@pytest.fixture(scope="module")
def fitted(tiny_encoder):
    texts, labels = toy_texts(160)
    return TextClassifier(base=tiny_encoder, **FAST).fit(texts, labels)


def test_fit_returns_self_and_learns(fitted):
    texts, labels = toy_texts(60, seed=9)
    assert fitted.classes_ == ["calm", "urgent"]
    assert np.mean(np.array(fitted.predict(texts)) == np.array(labels)) > 0.9
    assert fitted.temperature_ > 0
    assert set(fitted.calibration_) >= {"temperature", "ece_before", "ece_after"}


def test_one_text_in_one_answer_out(fitted):
    row = fitted.predict_proba("server down now")
    assert row.shape == (2,) and abs(row.sum() - 1) < 1e-5
    assert isinstance(fitted.predict("server down now"), str)
    many = fitted.predict_proba(["server down now", "thanks a lot"])
    assert many.shape == (2, 2)
    assert fitted.predict_proba([]).shape == (0, 2)


def test_init_only_stores_parameters(tiny_encoder):
    clf = TextClassifier(base=tiny_encoder, epochs=2)
    assert clf.settings.epochs == 2 and not hasattr(clf, "classes_")
    with pytest.raises(UserError, match="not fitted"):
        clf.predict("x")
    with pytest.raises(TypeError, match="unknown setting"):
        TextClassifier(epoch=3)


def test_save_load_round_trip_and_plain_transformers_agree(fitted, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fitted.save(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "potluck.json", "README.md", "training_log.jsonl"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    texts = ["server down now", "thanks for the great call", "payment failed today"]
    loaded = TextClassifier.load(tmp_path / "model", precision="fp32")
    np.testing.assert_allclose(loaded.predict_proba(texts), fitted.predict_proba(texts), atol=1e-6)

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    plain = torch.softmax(logits, dim=-1).numpy()
    np.testing.assert_allclose(plain, fitted.predict_proba(texts), atol=1e-5)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "calm", "1": "urgent"}


def test_same_seed_same_model(tiny_encoder, toy_data):
    texts, labels = toy_data
    a = TextClassifier(base=tiny_encoder, seed=3, **FAST).fit(texts, labels)
    b = TextClassifier(base=tiny_encoder, seed=3, **FAST).fit(texts, labels)
    np.testing.assert_array_equal(a.predict_proba(texts[:10]), b.predict_proba(texts[:10]))


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_encoder, toy_data, tmp_path):
    texts, labels = toy_data
    settings = dict(FAST, epochs=3, patience=5)
    whole = TextClassifier(base=tiny_encoder, **settings).fit(texts, labels)

    def die_in_epoch_two(event):
        if event.get("epoch") == 2 and "step" in event:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TextClassifier(base=tiny_encoder, **settings).fit(texts, labels, checkpoint_dir=tmp_path / "ckpt",
                                                         on_step=die_in_epoch_two)
    assert (tmp_path / "ckpt" / "epoch-0001").is_dir()
    resumed = TextClassifier(base=tiny_encoder, **settings).fit(texts, labels, checkpoint_dir=tmp_path / "ckpt",
                                                               resume=True)
    assert resumed.fit_result_.epochs_run == 3
    np.testing.assert_allclose(resumed.predict_proba(texts[:20]), whole.predict_proba(texts[:20]), atol=1e-5)


def test_resume_refuses_other_settings(tiny_encoder, toy_data, tmp_path):
    texts, labels = toy_data
    TextClassifier(base=tiny_encoder, **dict(FAST, epochs=1)).fit(texts, labels, checkpoint_dir=tmp_path / "c")
    with pytest.raises(UserError, match="other settings"):
        TextClassifier(base=tiny_encoder, **dict(FAST, epochs=1, learning_rate=1e-4)).fit(
            texts, labels, checkpoint_dir=tmp_path / "c", resume=True)


def test_balanced_class_weights_train(tiny_encoder):
    texts = ["server down now"] * 10 + ["thanks great call"] * 60 + ["payment failed today"] * 10
    labels = ["urgent"] * 10 + ["calm"] * 60 + ["urgent"] * 10
    clf = TextClassifier(base=tiny_encoder, class_weights="balanced", **FAST).fit(texts, labels)
    assert clf.predict("server down now") == "urgent"


def test_evaluate_reports_metrics(fitted):
    texts, labels = toy_texts(40, seed=5)
    metrics = fitted.evaluate(texts, labels)
    assert metrics["n"] == 40 and 0 <= metrics["ece"] <= 1
    assert set(metrics["per_class"]) == {"calm", "urgent"}


def test_word_embeddings_stay_fixed_by_default_and_the_rest_trains(tiny_encoder):
    """The default keeps the word-embedding matrix (the bulk of a small encoder) out of the optimiser;
    every other weight moves, and the saved model is an ordinary trainable one again."""
    from transformers import AutoModel

    texts, labels = toy_texts(40)
    clf = TextClassifier(base=tiny_encoder, **dict(FAST, epochs=1, precision="auto", train_word_embeddings=False)).fit(texts, labels)
    model = clf.predictor_.model
    before = AutoModel.from_pretrained(tiny_encoder).state_dict()
    after = {k.removeprefix("bert."): v for k, v in model.state_dict().items()}
    assert torch.equal(after["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])
    assert not torch.equal(after["encoder.layer.0.attention.self.query.weight"],
                           before["encoder.layer.0.attention.self.query.weight"])
    assert all(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_the_new_head_gets_its_own_learning_rate(tiny_encoder):
    from potluck.encoders import load_for_classification
    from potluck.training import make_optimizer

    model = load_for_classification(tiny_encoder, ["a", "b"])
    optimizer = make_optimizer(model, learning_rate=1e-4, weight_decay=0.01, head_learning_rate=1e-2)
    head = {id(p) for p in model.classifier.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr"] == (1e-2 if in_head.pop() else 1e-4)
    same = make_optimizer(model, learning_rate=1e-4, weight_decay=0.01, head_learning_rate=0)
    assert {g["lr"] for g in same.param_groups} == {1e-4}


@pytest.mark.parametrize("kind,runs", [("amx", "bf16"), ("avx2", "fp32")])
def test_training_precision_follows_the_cpu(tiny_encoder, kind, runs):
    """Fine-tuning asks potluck.hardware too: bf16 autocast where the CPU has native bf16 (the AMX path's
    logic, pretended on any host), fp32 where it would be emulated (the AVX2 fallback)."""
    from potluck.hardware import pretend

    texts, labels = toy_texts(40)
    with pretend(kind):
        clf = TextClassifier(base=tiny_encoder, **{**FAST, "epochs": 1, "precision": "bf16"}).fit(texts, labels)
    assert clf.training_summary()["precision"] == runs


def test_a_scikit_learn_estimator_clone_cross_validation_and_grid_search(tiny_encoder):
    from sklearn.base import clone, is_classifier
    from sklearn.model_selection import cross_val_score

    clf = TextClassifier(base=tiny_encoder, **{**FAST, "epochs": 1})
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params() and is_classifier(clf)
    assert clf.set_params(epochs=2, seed=3) is clf and clf.settings.epochs == 2 and clf.get_params()["seed"] == 3
    with pytest.raises(ValueError, match="unknown parameter"):
        clf.set_params(epoch=2)
    texts, labels = toy_texts(90)
    scores = cross_val_score(TextClassifier(base=tiny_encoder, **FAST), texts, labels, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8
