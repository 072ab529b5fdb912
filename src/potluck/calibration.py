"""Temperature scaling (Guo et al., 2017), expected calibration error, and folding T into the head.

One scalar T > 0 divides the logits; it is fitted by minimising the negative log-likelihood on the
validation split. It never changes the argmax, only how confident the probabilities are. Because the
head is linear, softmax(Wx + b) / T = softmax((W/T) x + b/T): we fold T into the head's weights, so a
saved folder gives calibrated probabilities in plain transformers too.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, prior_sd: float = 0.5,
                    max_iter: int = 200) -> float:
    """The temperature that minimises the NLL of softmax(logits / T) on (logits, labels).

    A Gaussian prior on log T (mean 0, sd `prior_sd`) makes this a MAP estimate: with a few hundred
    examples the data decide, but a small validation split that the model gets entirely right no
    longer drives T towards 0 (which would claim certainty nobody measured).
    """
    z = torch.as_tensor(logits, dtype=torch.float64)  # (N, C)
    y = torch.as_tensor(labels, dtype=torch.long)  # (N,)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(z / log_t.exp(), y, reduction="sum")
        loss = nll + 0.5 * (log_t / prior_sd) ** 2
        loss.backward()
        return loss

    opt.step(closure)
    temperature = float(log_t.detach().exp().clamp(0.05, 20.0))
    logger.info("fitted temperature %.3f on %d examples", temperature, len(y))
    return temperature


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins: sum_b |B|/N * |accuracy(B) - confidence(B)|."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # confidence 1.0 goes to the top bin
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def calibrate(logits: np.ndarray, labels: np.ndarray, *, enabled: bool = True) -> tuple[float, dict]:
    """A temperature for validation `logits` (N, C), and the record potluck.json keeps of it. The fitted
    temperature is kept only when it does not raise the validation ECE (then 1, and the record says why)."""
    before = expected_calibration_error(softmax(logits), labels)
    fitted = fit_temperature(logits, labels) if enabled else 1.0
    ece_fitted = expected_calibration_error(softmax(logits, fitted), labels)
    kept = not enabled or ece_fitted <= before
    if not kept:
        logger.warning("calibration not kept: temperature %.3f raised validation ECE from %.4f to %.4f",
                       fitted, before, ece_fitted)
    temperature = fitted if kept else 1.0
    record = {"method": "temperature" if enabled and kept else "none", "temperature": temperature,
              "ece_before": before, "ece_after": ece_fitted if kept else before, "fitted_on": "validation split"}
    if not kept:
        record["not_kept"] = f"temperature {fitted:.4g} raised validation ECE from {before:.4f} to {ece_fitted:.4f}"
    return temperature, record


def fold_temperature(model, temperature: float) -> None:
    """Divide the final linear layer of a sequence-classification model by T, in place."""
    head = final_linear(model)
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def final_linear(model) -> torch.nn.Linear:
    """The layer that produces the logits (BERT: `classifier`; RoBERTa-style: `classifier.out_proj`)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        return head
    out_proj = getattr(head, "out_proj", None)
    if isinstance(out_proj, torch.nn.Linear):
        return out_proj
    raise TypeError(f"cannot find the final linear layer of {type(model).__name__}")
