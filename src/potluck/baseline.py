"""The classical baseline: TF-IDF features and logistic regression (scikit-learn), calibrated like Potluck.

    from potluck.baseline import TfidfBaseline
    base = TfidfBaseline(seed=0).fit(texts, labels)   # or .fit(train, valid=valid) with LabelledData
    base.predict_proba(["The server is down"])          # columns follow base.classes_

    potluck evaluate models/urgency --data test.csv --baseline tfidf

To be a fair anchor it gets what Potluck gets: the same training part and the same held-out validation
part (a stratified split with the same fraction and seed when no validation file is given). On the
validation part it chooses the regularisation strength C, then fits one temperature by minimising the
NLL (Potluck's own `calibration.fit_temperature`). Features: word 1-2-grams plus character 2-5-grams
within word boundaries, both sublinear TF-IDF, a strong classical setting for short texts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import FeatureUnion

from potluck import calibration
from potluck.data import LabelledData, as_labelled, check_known_labels
from potluck.errors import UserError
from potluck.splits import stratified_split, training_split

logger = logging.getLogger(__name__)

BASELINES = ("tfidf",)


@dataclass
class BaselineSettings:
    """How to fit the TF-IDF + logistic-regression baseline."""

    c_grid: tuple[float, ...] = field(default=(1.0, 10.0, 100.0),
                                      metadata={"help": "inverse regularisation strengths tried; the best on validation macro-F1 wins"})
    valid_fraction: float = field(default=0.1, metadata={"help": "stratified share held back when no validation data is given"})
    calibrate: bool = field(default=True, metadata={"help": "fit a temperature on the validation part"})
    max_iter: int = field(default=2000, metadata={"help": "iterations of the LBFGS solver"})
    seed: int = field(default=0, metadata={"help": "seed of the validation split"})


class TfidfBaseline:
    """TF-IDF (word 1-2-grams + char 2-5-grams) and multinomial logistic regression, temperature-calibrated."""

    def __init__(self, settings: BaselineSettings | None = None, **overrides):
        base = settings or BaselineSettings()
        self.settings = BaselineSettings(**{**base.__dict__, **overrides}) if overrides else base

    def fit(self, texts: Sequence[str] | LabelledData, labels: Sequence | None = None, *,
            valid: LabelledData | None = None) -> TfidfBaseline:
        """Fit on `texts` (or a LabelledData); choose C and the temperature on `valid` or a split of it."""
        s = self.settings
        train, valid, _, _ = training_split(as_labelled(texts, labels), valid, s.valid_fraction, s.seed)
        self.classes_ = sorted(set(train.labels))
        check_known_labels(valid, self.classes_, role="validation")
        index = {c: i for i, c in enumerate(self.classes_)}
        y_train = np.array([index[y] for y in train.labels])
        y_valid = np.array([index[y] for y in valid.labels])

        self.features_ = make_features().fit(train.texts)
        x_train, x_valid = self.features_.transform(train.texts), self.features_.transform(valid.texts)
        best = None
        for c in s.c_grid:
            model = LogisticRegression(C=c, max_iter=s.max_iter).fit(x_train, y_train)
            score = f1_score(y_valid, model.predict(x_valid), average="macro", labels=list(range(len(index))),
                             zero_division=0)
            logger.info("tfidf baseline: C=%g validation macro-F1 %.4f", c, score)
            if best is None or score > best[0] + 1e-9:
                best = (score, c, model)
        _, self.C_, self.model_ = best
        valid_logits = self.model_.predict_log_proba(x_valid)  # (N, C): log-softmax, valid logits for T
        self.temperature_ = calibration.fit_temperature(valid_logits, y_valid) if s.calibrate else 1.0
        self.calibration_ = {
            "method": "temperature" if s.calibrate else "none", "temperature": self.temperature_,
            "ece_before": calibration.expected_calibration_error(calibration.softmax(valid_logits), y_valid),
            "ece_after": calibration.expected_calibration_error(
                calibration.softmax(valid_logits, self.temperature_), y_valid),
            "fitted_on": "validation split", "C": self.C_,
        }
        self.data_ = {"n_train": len(train), "n_valid": len(valid), "fingerprint": train.fingerprint()}
        return self

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Uncalibrated logits (N, C) (log-probabilities of the logistic regression)."""
        self._check_fitted()
        if len(texts) == 0:
            return np.zeros((0, len(self.classes_)))
        return self.model_.predict_log_proba(self.features_.transform(list(texts)))

    def predict_proba(self, texts: str | Sequence[str]) -> np.ndarray:
        """Calibrated probabilities; columns follow `classes_`. One text in, a 1-D row out."""
        if isinstance(texts, str):
            return self.predict_proba([texts])[0]
        return calibration.softmax(self.logits(texts), self.temperature_)

    def predict(self, texts: str | Sequence[str]) -> str | list[str]:
        probs = self.predict_proba(texts)
        if probs.ndim == 1:
            return self.classes_[int(probs.argmax())]
        return [self.classes_[i] for i in probs.argmax(axis=1)]

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise UserError("this TfidfBaseline is not fitted yet", hint="call fit(texts, labels)")

    def __repr__(self) -> str:
        return f"TfidfBaseline(seed={self.settings.seed})"


def make_features() -> FeatureUnion:
    """Sublinear TF-IDF of word 1-2-grams and of character 2-5-grams inside word boundaries."""
    return FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2,
                                  lowercase=True)),
    ])


def make_baseline(name: str, *, seed: int = 0) -> TfidfBaseline:
    """The baseline called `name` on the command line."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline '{name}'", hint=f"use one of: {', '.join(BASELINES)}")
    return TfidfBaseline(seed=seed)


def model_training_data(clf, train_path: str | os.PathLike | None = None,
                        ) -> tuple[LabelledData, LabelledData, list[str]]:
    """The training and validation parts a saved model was fine-tuned on, as recorded in its potluck.json.

    Without a validation file the same stratified split is made again (same fraction, same seed), so the
    baseline learns from the same examples and calibrates on the same held-out ones. Returns (train,
    valid, notes); a note says when the data differ from the fingerprint the model recorded.
    """
    from potluck.data import read_data

    recorded = getattr(clf, "data_", {}) or {}
    path = train_path or recorded.get("train_path")
    if not path:
        raise UserError("the model folder does not record the file it was trained on",
                        hint="pass the training data with --baseline-data FILE")
    if not Path(path).exists():
        raise UserError(f"the model's training data {path} is not there any more",
                        hint="pass the training data with --baseline-data FILE")
    columns = recorded.get("text_column", "text"), recorded.get("label_column", "label")
    data = read_data(path, *columns)
    valid_path = None if train_path else recorded.get("valid_path")
    if valid_path and Path(valid_path).exists():
        train, valid = data, read_data(valid_path, *columns)
    else:
        train, valid = stratified_split(data, clf.settings.valid_fraction, seed=clf.settings.seed)
    notes = []
    if recorded.get("fingerprint") and train.fingerprint() != recorded["fingerprint"]:
        notes.append(f"{path} is not the data the model was trained on (its fingerprint differs): "
                     "the baseline learns from other examples than the model did")
    for note in notes:
        logger.warning("%s", note)
    return train, valid, notes
