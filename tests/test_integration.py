"""The real embedded encoder on real data (../shared/data): what users rely on, measured."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import shared_dataset

from potluck import TextClassifier, read_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sms_model(tmp_path_factory):
    train = read_data(shared_dataset("sms_spam", "train"))
    order = random.Random(0).sample(range(len(train)), 1000)
    clf = TextClassifier("minilm", epochs=3).fit(train.select(order))
    folder = tmp_path_factory.mktemp("sms") / "model"
    clf.save(folder)
    return clf, folder


def test_sms_spam_with_1000_examples_is_accurate_and_calibrated(sms_model):
    clf, _ = sms_model
    metrics = clf.evaluate(read_data(shared_dataset("sms_spam", "test")))
    print(json.dumps({k: metrics[k] for k in ("accuracy", "macro_f1", "ece")}))
    assert metrics["accuracy"] >= 0.95
    assert metrics["ece"] <= 0.03


def test_saved_minilm_folder_gives_the_same_probabilities_in_plain_transformers(sms_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf, folder = sms_model
    texts = ["WINNER!! Claim your free prize now, text WIN to 80082", "Are we still on for lunch tomorrow?",
             "Call me when you get home", "URGENT: your account has been selected for a cash reward"]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)).logits
    plain = torch.softmax(logits, dim=-1).numpy()
    ours = TextClassifier.load(folder, precision="fp32").predict_proba(texts)
    np.testing.assert_allclose(ours, plain, atol=1e-5)
    assert model.config.id2label == dict(enumerate(clf.classes_))
