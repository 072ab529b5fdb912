"""The fast batched predictor, shared by the CLI, the Python API and the server.

    from potluck.inference import Predictor
    predictor = Predictor.from_folder("models/urgency", precision="bf16")
    probs = predictor.predict_proba(["The site is down!"])     # (N, C), columns follow id2label

Texts are sorted by length into batches with dynamic padding, run under `torch.inference_mode`, with
bf16 autocast where the hardware has it, and put back in the caller's order.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from potluck.batching import inference_batches, pad, tokenize
from potluck.calibration import softmax
from potluck.errors import UserError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU does bf16 matmul natively (AVX512-BF16 or AMX); elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def use_bf16(precision: str, device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if precision == "bf16":
        return True
    if precision != "auto":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@torch.inference_mode()
def batched_logits(model, ids: Sequence[Sequence[int]], *, pad_id: int, bf16: bool = False,
                   device: torch.device | str = "cpu", batch_size: int = 64,
                   max_tokens: int | None = 16384) -> np.ndarray:
    """Logits (N, C) as float32 for token-id lists, in their original order."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    for batch in inference_batches([len(row) for row in ids], batch_size, max_tokens):
        input_ids, mask = pad([ids[i] for i in batch], pad_id)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (B, C)
        out[batch] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


class Predictor:
    """A loaded sequence-classification model and its tokenizer, ready for fast batched prediction."""

    def __init__(self, model, tokenizer, *, max_length: int = 128, precision: str = "auto",
                 batch_size: int = 64, device: str = "cpu"):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        self.bf16 = use_bf16(precision, self.device)
        model.eval()
        if precision == "int8":
            model = quantize_int8(model)
        self.model = model.to(self.device)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs) -> Predictor:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)",
                            hint="pass the --out folder of `potluck finetune`")
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs.setdefault("max_length", _max_length(path))
        return cls(model, tokenizer, **kwargs)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, texts, self.max_length)
        return batched_logits(self.model, ids, pad_id=self.tokenizer.pad_token_id, bf16=self.bf16,
                              device=self.device, batch_size=self.batch_size)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return softmax(self.logits(texts)).astype(np.float32)


def quantize_int8(model):
    """Dynamic int8 quantisation of the Linear layers (weights int8, activations quantised on the fly)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _max_length(folder: Path) -> int:
    meta = folder / "potluck.json"
    if meta.is_file():
        import json

        return int(json.loads(meta.read_text()).get("settings", {}).get("max_length", 128))
    return 128
