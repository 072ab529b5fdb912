"""TextClassifier: fit / predict / predict_proba / save / load, in the scikit-learn manner.

    from potluck import TextClassifier
    clf = TextClassifier(base="minilm").fit(texts, labels)   # fit returns self
    clf.predict_proba(["The server is down"])                 # columns follow clf.classes_
    clf.save("models/urgency"); clf = TextClassifier.load("models/urgency")

`__init__` only stores what it is given; everything learned from data ends in an underscore.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from potluck import calibration, distributed
from potluck.batching import batched_logits, tokenize
from potluck.data import LabelledData, as_labelled, check_known_labels
from potluck.encoders import DEFAULT_BASE, load_config, load_for_classification, load_tokenizer, resolve_base
from potluck.errors import UserError
from potluck.evaluation import classification_metrics, validation_summary
from potluck.finetune import FinetuneSettings, run
from potluck.folder import new_meta, read_meta, write_folder
from potluck.inference import Predictor
from potluck.splits import data_record, training_split

logger = logging.getLogger(__name__)

SETTING_NAMES = [f.name for f in fields(FinetuneSettings)]


class TextClassifier(ClassifierMixin, BaseEstimator):
    """A pre-trained encoder plus a classification head, fine-tuned and calibrated.

    Parameters: `base` ("minilm", a model folder or a hub id) and any `FinetuneSettings` field
    (epochs, batch_size, learning_rate, class_weights, precision, seed, ...), or `settings=`.
    A scikit-learn estimator: `get_params` / `set_params` name `base` and every setting, so
    `sklearn.base.clone`, `cross_val_score` and grid searches work; `score` is accuracy.
    """

    def __init__(self, base: str | os.PathLike = DEFAULT_BASE, *, settings: FinetuneSettings | None = None,
                 **overrides):
        unknown = set(overrides) - set(SETTING_NAMES)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        self.base = str(base)
        self.settings = settings or FinetuneSettings()
        if overrides:
            self.settings = FinetuneSettings(**{**asdict(self.settings), **overrides})

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters: `base` and every FinetuneSettings field."""
        return {"base": self.base, **{name: getattr(self.settings, name) for name in SETTING_NAMES}}

    def set_params(self, **params) -> TextClassifier:
        unknown = set(params) - set(SETTING_NAMES) - {"base"}
        if unknown:
            raise ValueError(f"unknown parameter(s) for TextClassifier: {', '.join(sorted(unknown))}")
        if "base" in params:
            self.base = str(params.pop("base"))
        self.settings = FinetuneSettings(**{**asdict(self.settings), **params})
        return self

    def score(self, texts: Sequence[str], labels: Sequence, sample_weight=None) -> float:
        """Accuracy on (texts, labels), labels compared as strings (as `fit` stores them)."""
        hits = np.asarray(self.predict(list(texts))) == np.asarray([str(y) for y in labels])
        return float(np.average(hits, weights=sample_weight))

    # -- learning ---------------------------------------------------------------------------------

    def fit(self, texts: Sequence[str] | LabelledData, labels: Sequence | None = None, *,
            valid: LabelledData | tuple[Sequence[str], Sequence] | None = None,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
            on_step: Callable[[dict], None] | None = None) -> TextClassifier:
        """Fine-tune on (texts, labels), early-stop and calibrate on `valid` (or a stratified split)."""
        s = self.settings
        self._check_base()  # a wrong base or max_length fails before any work is done
        train, valid, valid_source, self.warnings_ = training_split(
            as_labelled(texts, labels), as_labelled(valid) if valid is not None else None, s.valid_fraction, s.seed)
        if s.calibrate and len(valid) < 100:
            logger.warning("calibrating on only %d validation examples: probabilities will be rough; "
                           "a validation set of a few hundred gives honest ones", len(valid))
        self.classes_ = sorted(set(train.labels))
        index = {label: i for i, label in enumerate(self.classes_)}
        y_train, y_valid = (np.array([index[y] for y in part.labels]) for part in (train, valid))

        torch.manual_seed(s.seed)  # the new head's initial weights
        tokenizer = load_tokenizer(self.base)
        model = load_for_classification(self.base, self.classes_)
        train_ids, valid_ids = (tokenize(tokenizer, part.texts, s.max_length) for part in (train, valid))
        result = run(model, train_ids, y_train, valid_ids, y_valid, s, pad_id=tokenizer.pad_token_id,
                     checkpoint_dir=checkpoint_dir, resume=resume, fingerprint=train.fingerprint(),
                     on_step=on_step)
        self.history_, self.fit_result_ = result.history, result
        valid_logits = result.valid_logits  # the best epoch's, computed by `run` (not after a resume)
        if valid_logits is None:
            valid_logits = batched_logits(model, valid_ids, pad_id=tokenizer.pad_token_id, bf16=result.bf16,
                                          device=next(model.parameters()).device)
        self.temperature_, self.calibration_ = calibration.calibrate(valid_logits, y_valid, enabled=s.calibrate)
        calibration.fold_temperature(model, self.temperature_)
        self.metrics_ = validation_summary(y_valid, calibration.softmax(valid_logits, self.temperature_), self.classes_)
        self.data_ = data_record(train, valid, valid_source)
        self.predictor_ = Predictor(model, tokenizer, max_length=s.max_length,
                                    precision=s.precision, device=str(next(model.parameters()).device))
        logger.info("fitted: best epoch %d, temperature %.3f, validation ECE %.4f -> %.4f",
                    result.best_epoch, self.temperature_, self.calibration_["ece_before"],
                    self.calibration_["ece_after"])
        return self

    def _check_base(self) -> None:
        resolve_base(self.base)
        positions = getattr(load_config(self.base), "max_position_embeddings", None)
        if isinstance(positions, int) and self.settings.max_length > positions:
            raise UserError(f"max_length {self.settings.max_length} is longer than base '{self.base}' allows "
                            f"({positions} positions)", hint=f"use --max-length {positions} or less")

    # -- predicting -------------------------------------------------------------------------------

    def predict_proba(self, texts: str | Sequence[str]) -> np.ndarray:
        """Calibrated probabilities; columns follow `classes_`. One text in, a 1-D row out."""
        self._check_fitted()
        if isinstance(texts, str):
            return self.predictor_.predict_proba([texts])[0]
        return self.predictor_.predict_proba(list(texts))

    def predict(self, texts: str | Sequence[str]) -> str | list[str]:
        probs = self.predict_proba(texts)
        if probs.ndim == 1:
            return self.classes_[int(probs.argmax())]
        return [self.classes_[i] for i in probs.argmax(axis=1)]

    def evaluate(self, texts: Sequence[str] | LabelledData, labels: Sequence | None = None) -> dict:
        """Accuracy, macro-F1, ECE and the per-class table on labelled data."""
        data = as_labelled(texts, labels)
        check_known_labels(data, self.classes_)
        index = {label: i for i, label in enumerate(self.classes_)}
        return classification_metrics([index[y] for y in data.labels], self.predict_proba(data.texts),
                                      self.classes_)

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, command: str | None = None,
             history: bool = True, overwrite: bool = False) -> Path:
        """Write a Hugging Face model folder (atomically) with potluck.json and a model card. An existing
        non-empty folder at `path` is replaced only with `overwrite` (else a UserError)."""
        self._check_fitted()
        if not distributed.context().is_main:
            return Path(path)  # under torchrun, rank 0 writes the folder
        def fill(tmp: Path) -> None:
            self.predictor_.model.save_pretrained(tmp, safe_serialization=True)
            self.predictor_.tokenizer.save_pretrained(tmp)

        write_folder(path, self.metadata(command=command, name=Path(path).name), fill, overwrite=overwrite,
                     log=getattr(self, "history_", None) if history else None)
        logger.info("saved %s", path)
        return Path(path)

    def metadata(self, *, command: str | None = None, name: str | None = None) -> dict:
        return new_meta("potluck.classifier/1", name=name, base=self.base, classes=list(self.classes_),
                        settings=asdict(self.settings), calibration=self.calibration_, metrics=self.metrics_,
                        data=self.data_, training=self.training_summary(), command=command)

    def training_summary(self) -> dict:
        r = getattr(self, "fit_result_", None)
        if r is None:
            return getattr(self, "meta_", {}).get("training", {})
        return {"best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "examples_per_s": round(r.examples_per_s, 2),
                "precision": "bf16" if r.bf16 else "fp32", "processes": r.world_size}

    @classmethod
    def load(cls, path: str | os.PathLike, *, precision: str = "auto", device: str = "cpu") -> TextClassifier:
        """Load a folder written by `save` (safetensors only)."""
        path = Path(path)
        if not (path / "potluck.json").is_file():
            if not path.exists():
                raise UserError(f"no such model folder: {path}", hint="pass the --out folder of `potluck finetune`")
            raise UserError(f"{path} is not a Potluck model folder (no potluck.json)",
                            hint="fine-tune one with `potluck finetune`")
        meta = read_meta(path)
        settings = FinetuneSettings(**{k: v for k, v in meta.get("settings", {}).items() if k in SETTING_NAMES})
        clf = cls(meta["base"], settings=settings)
        clf.predictor_ = Predictor.from_folder(path, precision=precision, device=device,
                                               max_length=settings.max_length)
        clf.classes_ = list(meta["classes"])
        if clf.predictor_.labels != clf.classes_:
            raise UserError(f"{path}: config.json labels {clf.predictor_.labels} disagree with potluck.json",
                            hint="re-save the model with potluck")
        clf.calibration_ = meta.get("calibration", {})
        clf.temperature_ = clf.calibration_.get("temperature", 1.0)
        clf.metrics_ = meta.get("metrics", {})
        clf.data_ = meta.get("data", {})
        clf.meta_ = meta
        return clf

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            raise UserError("this TextClassifier is not fitted yet", hint="call fit(texts, labels) or load(folder)")

    def __repr__(self) -> str:
        changed = {k: v for k, v in asdict(self.settings).items() if getattr(FinetuneSettings(), k) != v}
        args = ", ".join([repr(self.base)] + [f"{k}={v!r}" for k, v in changed.items()])
        return f"TextClassifier({args})"


def remove_checkpoints(folder: str | os.PathLike | None) -> None:
    if folder and Path(folder).exists():
        shutil.rmtree(folder, ignore_errors=True)
