"""The evaluation gate: a candidate base is promoted only if it is at least as good on every task.

    from potluck.commons.gate import GateSettings, TaskData, run_gate
    decision = run_gate("fused/", "base/", {"urgency": TaskData(train_x, train_y, eval_x, eval_y)})
    decision.promote, decision.reason, decision.to_json()

For each task, a head is trained on each base with the encoder frozen: the texts are embedded once per
base (under `torch.inference_mode`, bf16 autocast where the CPU has it), a scikit-learn logistic
regression is fitted on the train features and scored by macro-F1 on the eval part. With
`full_finetune_epochs > 0` each task is instead fine-tuned end to end (TextClassifier) for that many
epochs: slower, closer to what users will do with the base. The candidate is promoted only if its mean
score is at least the current base's and no task falls by more than `margin`.

`fit_head` / `save_head_model` / `refit_task_model` give a served model per task on a (new) base: the
same frozen-encoder logistic regression on the **pooler output**, which is exactly what
`BertForSequenceClassification` feeds its `classifier` layer, so the regression becomes that layer
(scaler folded in, temperature folded in) and the folder is an ordinary Potluck/Hugging Face classifier.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from potluck import calibration
from potluck.batching import inference_batches, pad, tokenize
from potluck.data import LabelledData, as_labelled, check_known_labels, check_training_data
from potluck.encoders import load_for_classification, load_tokenizer, resolve_base
from potluck.errors import UserError, require
from potluck.evaluation import classification_metrics, validation_summary
from potluck.folder import HEADS, load_pretrained, new_meta, write_folder
from potluck.hardware import plan_precision
from potluck.splits import data_record, training_split

logger = logging.getLogger(__name__)

POOLINGS = ("pooler", "mean", "cls")


class TaskData(NamedTuple):
    """One task's labelled data for the gate: train a head on the first part, score it on the second."""

    train_texts: Sequence[str]
    train_labels: Sequence
    eval_texts: Sequence[str]
    eval_labels: Sequence


@dataclass
class GateSettings:
    """How the gate judges a base. The budget (head only, or a short fine-tune) is recorded with each decision."""

    margin: float = field(default=0.02, metadata={"help": "largest drop in one task's macro-F1 a promotion may cause"})
    pooling: str = field(default="mean", metadata={
        "help": "frozen features: 'mean' (of the last hidden states), 'cls', or 'pooler' (what a BERT head sees)"})
    regularization: float = field(default=1.0, metadata={
        "help": "C of the gate's logistic regression (smaller = stronger)"})
    head_regularization: float = field(default=10.0, metadata={
        "help": "C of the served frozen head on pooler features (refit_task_model)"})
    full_finetune_epochs: int = field(default=0, metadata={
        "help": "0: head only on the frozen encoder; > 0: fine-tune each task end to end for this many epochs"})
    max_length: int = field(default=128, metadata={"help": "tokens per text; longer texts are truncated"})
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass when embedding"})
    precision: str = field(default="auto", metadata={"help": "'auto' (bf16 where the hardware has it), 'fp32' or 'bf16'"})
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'"})
    seed: int = field(default=0, metadata={"help": "seed of the regression, the splits and fine-tuning"})

    def __post_init__(self):
        require((self.pooling in POOLINGS, f"unknown pooling '{self.pooling}'", f"use one of {', '.join(POOLINGS)}"),
                (0 <= self.margin < 1, f"margin must be in [0, 1), got {self.margin}", "e.g. 0.02"),
                (self.full_finetune_epochs >= 0, "full_finetune_epochs must be 0 or more"),
                (min(self.regularization, self.head_regularization) > 0,
                 "regularization and head_regularization must be positive"))


@dataclass
class GateDecision:
    """The gate's verdict with every score, ready to be recorded as JSON."""

    promote: bool
    reason: str
    scores: dict[str, dict[str, float]]  # task -> {"candidate": macro-F1, "current": macro-F1}
    mean_candidate: float
    mean_current: float
    settings: dict = field(default_factory=dict)  # the budget and margin it was judged with

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping) -> GateDecision:
        return cls(**{k: data[k] for k in ("promote", "reason", "scores", "mean_candidate", "mean_current")},
                   settings=dict(data.get("settings", {})))


# -- features of a frozen encoder -----------------------------------------------------------------

class FrozenEncoder:
    """A base encoder loaded once, turning texts into features (N, H) with the chosen pooling."""

    def __init__(self, base: str | os.PathLike, settings: GateSettings):
        from transformers import AutoModel

        self.base = str(base)
        self.settings = settings
        self.tokenizer = load_tokenizer(base)
        self.device = torch.device(settings.device)
        self.model = load_pretrained(AutoModel, resolve_base(base), name=f"base '{base}'", may_lack=("pooler.",),
                                     may_add=HEADS)[0].to(self.device).eval()
        self.bf16 = plan_precision(settings.precision, self.device, purpose="training").bf16

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], pooling: str | None = None) -> np.ndarray:
        pooling = pooling or self.settings.pooling
        ids = tokenize(self.tokenizer, texts, self.settings.max_length)
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        for batch in inference_batches([len(row) for row in ids], self.settings.batch_size, 16384):
            input_ids, mask = pad([ids[i] for i in batch], self.tokenizer.pad_token_id)  # (B, T)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                result = self.model(input_ids=input_ids, attention_mask=mask)
            if pooling == "pooler":
                features = result.pooler_output  # (B, H)
            elif pooling == "cls":
                features = result.last_hidden_state[:, 0]  # (B, H)
            else:
                weights = mask.unsqueeze(-1).to(result.last_hidden_state.dtype)  # (B, T, 1)
                features = (result.last_hidden_state * weights).sum(1) / weights.sum(1)  # (B, H)
            out[batch] = features.float().cpu().numpy()
        return out


def fit_regression(features: np.ndarray, labels: Sequence[str], regularization: float, seed: int = 0):
    """scikit-learn's L2 logistic regression on the raw features; classes_ are the sorted labels.

    No StandardScaler: folded into a head, 1/σ of nearly constant features gives weights that bf16
    inference cannot carry. Encoder features have a natural scale (pooler: tanh in [-1, 1]).
    """
    from sklearn.linear_model import LogisticRegression

    regression = LogisticRegression(C=regularization, max_iter=5000, random_state=seed)
    return regression.fit(features, list(labels))


def _task_data(name: str, task: TaskData) -> tuple[LabelledData, LabelledData]:
    train = LabelledData(list(task.train_texts), [str(y) for y in task.train_labels], path=f"task {name} (train)")
    held = LabelledData(list(task.eval_texts), [str(y) for y in task.eval_labels], path=f"task {name} (eval)")
    if not len(held):
        raise UserError(f"task {name} has no evaluation examples", hint="hold back part of its data for the gate")
    check_training_data(train)
    check_known_labels(held, sorted(set(train.labels)), role="evaluation")
    return train, held


# -- scoring and deciding ------------------------------------------------------------------------

def score_base(base: str | os.PathLike, tasks: Mapping[str, TaskData],
               settings: GateSettings | None = None) -> dict[str, float]:
    """Macro-F1 on each task's eval part of a head trained on `base` (frozen, or fine-tuned per settings)."""
    settings = settings or GateSettings()
    if not tasks:
        raise UserError("no task has evaluation data, so the gate cannot judge a base",
                        hint="share a dataset with --eval-only, or one with enough examples to hold some back")
    data = {name: _task_data(name, task) for name, task in tasks.items()}
    if settings.full_finetune_epochs > 0:
        return {name: _finetune_score(base, train, held, settings) for name, (train, held) in data.items()}
    encoder = FrozenEncoder(base, settings)
    scores = {}
    for name, (train, held) in data.items():
        head = fit_regression(encoder.embed(train.texts), train.labels, settings.regularization, settings.seed)
        classes = list(head.classes_)
        y = [classes.index(label) for label in held.labels]
        probs = head.predict_proba(encoder.embed(held.texts))  # (N, C)
        scores[name] = classification_metrics(y, probs, classes)["macro_f1"]
        logger.info("gate: %s on %s: macro-F1 %.4f", base, name, scores[name])
    return scores


def _finetune_score(base, train: LabelledData, held: LabelledData, settings: GateSettings) -> float:
    from potluck.classifier import TextClassifier

    clf = TextClassifier(base, epochs=settings.full_finetune_epochs, max_length=settings.max_length,
                         precision=settings.precision, device=settings.device, seed=settings.seed)
    return clf.fit(train).evaluate(held)["macro_f1"]


def decide(candidate: Mapping[str, float], current: Mapping[str, float], *, margin: float = 0.02,
           settings: dict | None = None) -> GateDecision:
    """Promote iff mean(candidate) >= mean(current) and no task falls by more than `margin`."""
    if set(candidate) != set(current) or not candidate:
        raise ValueError(f"candidate tasks {sorted(candidate)} and current tasks {sorted(current)} differ")
    tasks = sorted(candidate)
    scores = {t: {"candidate": float(candidate[t]), "current": float(current[t])} for t in tasks}
    mean_candidate = float(np.mean([candidate[t] for t in tasks]))
    mean_current = float(np.mean([current[t] for t in tasks]))
    eps = 1e-9  # sums of floats: an identical base must pass
    falls = {t: current[t] - candidate[t] for t in tasks if current[t] - candidate[t] > margin + eps}
    problems = []
    if mean_candidate < mean_current - eps:
        problems.append(f"mean macro-F1 {mean_candidate:.4f} is below the current base's {mean_current:.4f}")
    for t, drop in sorted(falls.items(), key=lambda item: -item[1]):
        problems.append(f"task '{t}' falls by {drop:.4f} ({current[t]:.4f} -> {candidate[t]:.4f}), "
                        f"more than the margin {margin}")
    if problems:
        reason = "rejected: " + "; ".join(problems)
    else:
        reason = (f"promoted: mean macro-F1 {mean_candidate:.4f} >= {mean_current:.4f} over {len(tasks)} task(s) "
                  f"and no task falls by more than {margin}")
    return GateDecision(not problems, reason, scores, mean_candidate, mean_current, dict(settings or {}))


def run_gate(candidate: str | os.PathLike, current: str | os.PathLike, tasks: Mapping[str, TaskData],
             settings: GateSettings | None = None, *,
             current_scores: Mapping[str, float] | None = None) -> GateDecision:
    """Score both bases on every task (or reuse `current_scores`) and decide."""
    settings = settings or GateSettings()
    if current_scores is None or set(current_scores) != set(tasks):
        current_scores = score_base(current, tasks, settings)
    candidate_scores = score_base(candidate, tasks, settings)
    budget = {**asdict(settings), "head": "full fine-tune" if settings.full_finetune_epochs else
              f"logistic regression on the frozen encoder's {settings.pooling} features",
              "metric": "macro_f1", "candidate": str(candidate), "current": str(current)}
    decision = decide(candidate_scores, current_scores, margin=settings.margin, settings=budget)
    logger.info("gate: %s", decision.reason)
    return decision


# -- a served head per task on a (new) base --------------------------------------------------------

class FrozenHead:
    """A logistic-regression head on the frozen encoder's pooler output, in the scikit-learn manner.

    The pooler output is what `BertForSequenceClassification` feeds its `classifier` layer (dropout is
    off at inference), so the fitted regression, with its scaler folded in, *is* that layer: `save`
    writes an ordinary classifier folder whose probabilities equal `predict_proba` here.
    """

    def __init__(self, base: str | os.PathLike, settings: GateSettings | None = None, *,
                 valid_fraction: float = 0.2):
        self.base = str(base)
        self.settings = settings or GateSettings()
        self.valid_fraction = valid_fraction

    def fit(self, texts: Sequence[str] | LabelledData, labels: Sequence | None = None, *,
            valid: LabelledData | tuple[Sequence[str], Sequence] | None = None,
            encoder: FrozenEncoder | None = None) -> FrozenHead:
        """Fit the regression on (texts, labels), calibrate a temperature on `valid` (or a stratified split)."""
        train, valid, valid_source, self.warnings_ = training_split(
            as_labelled(texts, labels), as_labelled(valid) if valid is not None else None, self.valid_fraction,
            self.settings.seed)
        self.encoder_ = encoder or FrozenEncoder(self.base, self.settings)
        regression = fit_regression(self.encoder_.embed(train.texts, "pooler"), train.labels,
                                    self.settings.head_regularization, self.settings.seed)
        self.classes_ = [str(c) for c in regression.classes_]
        self.coef_, self.intercept_ = linear_layer(regression)
        y_valid = np.array([self.classes_.index(label) for label in valid.labels])
        logits = self.encoder_.embed(valid.texts, "pooler") @ self.coef_.T + self.intercept_  # (N, C)
        self.temperature_, self.calibration_ = calibration.calibrate(logits, y_valid)
        self.metrics_ = validation_summary(y_valid, calibration.softmax(logits, self.temperature_), self.classes_)
        self.data_ = data_record(train, valid, valid_source)
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities (N, C); columns follow `classes_`."""
        logits = self.encoder_.embed(list(texts), "pooler") @ self.coef_.T + self.intercept_  # (N, C)
        return calibration.softmax(logits, self.temperature_)

    def save(self, path: str | os.PathLike, *, command: str | None = None, overwrite: bool = False) -> Path:
        """An ordinary classifier folder (config, safetensors, tokenizer, potluck.json, model card), atomically."""
        model = load_for_classification(self.base, self.classes_)
        head = calibration.final_linear(model)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(self.coef_, dtype=head.weight.dtype))  # (C, H)
            head.bias.copy_(torch.as_tensor(self.intercept_, dtype=head.bias.dtype))  # (C,)
        calibration.fold_temperature(model, self.temperature_)
        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            self.encoder_.tokenizer.save_pretrained(tmp)

        return write_folder(path, self.metadata(command=command, name=Path(path).name), fill, overwrite=overwrite)

    def metadata(self, *, command: str | None = None, name: str | None = None) -> dict:
        s = self.settings
        return new_meta("potluck.classifier/1", name=name, base=self.base, classes=list(self.classes_),
                        head={"kind": "logistic regression on the frozen encoder's pooler output",
                              "regularization": s.head_regularization, "encoder": "frozen"},
                        settings={"max_length": s.max_length, "precision": s.precision, "seed": s.seed,
                                  "device": s.device},
                        calibration=self.calibration_, metrics=self.metrics_, data=self.data_,
                        command=command or "potluck.commons.gate.FrozenHead(...).fit(...)")


def linear_layer(regression) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, H), bias (C,)) of a fitted LogisticRegression, as a classification layer.

    A binary regression has one row w: logits [0, w·x + b] give the same probabilities, by softmax.
    """
    weight, bias = regression.coef_, regression.intercept_  # (K, H), (K,)
    if weight.shape[0] == 1:
        weight = np.vstack([np.zeros_like(weight), weight])  # (2, H)
        bias = np.concatenate([[0.0], bias])  # (2,)
    return weight.astype(np.float32), bias.astype(np.float32)


def refit_task_model(base: str | os.PathLike, texts: Sequence[str], labels: Sequence,
                     out: str | os.PathLike, *, settings: GateSettings | None = None,
                     valid: tuple[Sequence[str], Sequence] | None = None, command: str | None = None) -> Path:
    """A served model for one task on `base`: a frozen-encoder head, or a short fine-tune
    when `settings.full_finetune_epochs > 0`. Returns the folder (`TextClassifier.load` / `Predictor.from_folder`)."""
    settings = settings or GateSettings()
    if settings.full_finetune_epochs > 0:
        from potluck.classifier import TextClassifier

        clf = TextClassifier(base, epochs=settings.full_finetune_epochs, max_length=settings.max_length,
                             precision=settings.precision, device=settings.device, seed=settings.seed)
        return clf.fit(texts, labels, valid=valid).save(out, command=command)
    return FrozenHead(base, settings).fit(texts, labels, valid=valid).save(out, command=command)
