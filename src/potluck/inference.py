"""The fast batched predictor, shared by the CLI, the Python API and the server.

    from potluck.inference import Predictor
    predictor = Predictor.from_folder("models/urgency", precision="bf16")
    probs = predictor.predict_proba(["The site is down!"])     # (N, C), columns follow id2label

Texts are tokenized in one call of the fast tokenizer, sorted by length into batches (at most
`batch_size` texts and `max_tokens` padded tokens each), run under `torch.inference_mode`, and put
back in the caller's order. On a CPU the batches run on `workers` threads at once (one per core
torch uses), each batch on one core: measured here, two single-threaded batches at a time run 1.5x
as fast as one batch at a time spread over both cores (OpenMP's per-op hand-offs and barriers cost
more than they give on the small matrices of a batch). A BERT classifier (MiniLM and every encoder `potluck pretrain` makes) runs
on `potluck.fastbert`: unpadded, and loaded from a folder with torch, safetensors and tokenizers only,
so `potluck predict` does not spend seconds importing transformers. Other models run on transformers
with dynamic padding. Precisions:

- `fp32`: the reference (fastbert's fp32 equals transformers' to 2e-5 in the tests).
- `bf16`: a copy of the model with bf16 weights, packed for oneDNN, where the CPU does bf16 matmul
  natively (AMX or AVX512-BF16). Casting the weights once, instead of on every call as autocast does,
  is what makes it fast. Elsewhere bf16 is emulated and many times slower: fp32 runs, and says so.
- `int8`: a copy whose encoder layers use smoothed, per-row dynamic int8 (`potluck.quantize`).
- `auto`: the fastest of these that kept >= 99.5 % label agreement with fp32 on this kind of CPU
  (`potluck.hardware.plan_precision`): bf16 where it is native, else fp32.

Precision decisions, and what a CPU can do, live in `potluck.hardware`. `backend="onnx"` runs the
folder's `onnx/model.onnx` (written by `potluck export`) on ONNX Runtime instead (`potluck.export`).

The copies snapshot the weights when the Predictor is built; `self.model` stays the fp32 transformers
model you gave (for a folder: loaded on first use, e.g. to save it again).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from potluck.batching import run_batches, tokenize
from potluck.calibration import softmax
from potluck.errors import NonFiniteOutput, UserError
from potluck.fastbert import FastBert, FastTokenizer
from potluck.hardware import INFERENCE_PRECISIONS, plan_precision

logger = logging.getLogger(__name__)

PRECISIONS = INFERENCE_PRECISIONS
BACKENDS = ("torch", "onnx")
# Padded tokens per batch: bf16 matmuls on AMX want big batches; fp32 gains nothing past ~64 texts.
MAX_TOKENS = {"fp32": 8192, "bf16": 16384, "int8": 8192}


@functools.cache
def worker_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """`workers` threads that each run one batch at a time on `threads` intra-op threads; shared by the
    Predictors of a process, so that serving many models does not multiply the threads.

    torch's thread count is per thread once set, but a thread that has not run a parallel op yet
    takes the process-wide value on its first one: so each worker first settles its own count, then
    sets `threads`, and the process-wide value is put back for every other thread."""
    def settle() -> None:
        torch.get_num_threads()  # this thread's own count exists from here on
        torch.set_num_threads(threads)

    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="potluck-model", initializer=settle)
    started = threading.Barrier(workers + 1)
    for _ in range(workers):  # start every worker now, while we can still restore the global count
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(before)
    return pool


class Predictor:
    """A sequence-classification model and its tokenizer, ready for fast batched prediction.

    Built from a transformers model and tokenizer (`Predictor(model, tokenizer)`), or from a folder
    (`Predictor.from_folder`). A BERT classifier runs on `potluck.fastbert` (unpadded batches, and
    from a folder without importing transformers at all); any other model runs on transformers;
    `backend="onnx"` runs the folder's ONNX export on ONNX Runtime. `model` stays the fp32
    transformers model you gave (loaded on first use for a folder), e.g. for saving; fp32 runs on
    `reference`, bf16 and int8 on a converted copy of it (`runner`). `plan` says which precision runs
    and, where it is not the one asked for, why.
    """

    def __init__(self, model=None, tokenizer=None, *, max_length: int = 128, precision: str = "auto",
                 batch_size: int | None = None, device: str = "cpu", max_tokens: int | None = None,
                 workers: int | None = None, folder: str | os.PathLike | None = None,
                 reference: FastBert | None = None, encoder: FastTokenizer | None = None, runner=None):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.max_length = max_length
        self.precision = precision
        self.plan = runner.plan if runner is not None else plan_precision(precision, self.device)
        self.precision_used = self.plan.used
        self.bf16 = self.plan.bf16
        self.backend = "onnx" if runner is not None else "torch"
        self.batch_size = batch_size or (128 if self.precision_used == "bf16" else 64)
        self.max_tokens = max_tokens or MAX_TOKENS[self.precision_used]
        cores = torch.get_num_threads()
        self.workers = workers or (cores if self.device.type == "cpu" else 1)  # batches running at once
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, not {self.workers}")
        self.threads = max(1, cores // self.workers)  # per batch
        self.pool = worker_pool(self.workers, self.threads)
        self.folder = Path(folder) if folder is not None else None
        self._model, self._tokenizer = model, tokenizer
        self.encoder = encoder  # None: transformers' tokenizer
        if runner is not None:  # ONNX Runtime; the fp32 torch reference is loaded when asked for
            self._reference, self.runner, self.labels = reference, runner, runner.labels
            return
        if reference is None:  # a transformers model was given: run it on fastbert where fastbert can
            model.eval()
            self._model = model.to(self.device)
            reference = FastBert.from_model(model) or model
        if isinstance(reference, FastBert):
            self.labels = reference.labels
        else:
            self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self._reference = reference.to(self.device).eval()
        self.runner = fast_copy(self._reference, self.precision_used, self)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, backend: str = "torch", **kwargs) -> Predictor:
        """Load a Hugging Face model folder (safetensors only); max_length from its potluck.json.
        backend 'onnx': its onnx/ export on ONNX Runtime (see `potluck export`)."""
        from potluck.folder import check_tokenizer, max_length_of, read_config

        path = Path(path)
        check_tokenizer(path, read_config(path))  # a missing tokenizer is an error, never a default one
        if backend not in BACKENDS:
            raise UserError(f"unknown backend '{backend}'", hint=f"use one of {', '.join(BACKENDS)}")
        if kwargs.get("max_length") is None:
            kwargs["max_length"] = max_length_of(path)
        if backend == "onnx":
            from potluck.export import OnnxRunner

            precision = kwargs.pop("precision", "auto")
            if precision not in PRECISIONS:
                raise UserError(f"unknown precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
            workers = kwargs.get("workers") or torch.get_num_threads()
            runner = OnnxRunner.from_folder(path, precision, threads=max(1, torch.get_num_threads() // workers))
            encoder = FastTokenizer.from_folder(path, kwargs["max_length"])
            return cls(folder=path, runner=runner, encoder=encoder, precision=precision, **kwargs)
        runner = FastBert.from_folder(path)
        encoder = FastTokenizer.from_folder(path, kwargs["max_length"]) if runner is not None else None
        if runner is not None and encoder is not None:  # no transformers needed
            return cls(folder=path, reference=runner, encoder=encoder, **kwargs)
        from transformers import AutoTokenizer

        return cls(load_checked(path), AutoTokenizer.from_pretrained(path), folder=path, **kwargs)

    @property
    def reference(self):
        """The fp32 model the other precisions are checked against (fastbert where it can)."""
        if self._reference is None:
            self._reference = (FastBert.from_folder(self.folder) or self.model).to(self.device).eval()
        return self._reference

    @property
    def model(self):
        """The fp32 transformers model (loaded from the folder on first use)."""
        if self._model is None:
            self._model = load_checked(self.folder).eval()
        return self._model

    @property
    def tokenizer(self):
        """The transformers tokenizer (loaded from the folder on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id if self.encoder is not None else self.tokenizer.pad_token_id

    def vocabulary(self) -> list[str]:
        """The tokenizer's tokens."""
        vocab = self.encoder.whole.get_vocab() if self.encoder is not None else self.tokenizer.get_vocab()
        return list(vocab)

    def encode(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids per text. With truncate=False a text longer than max_length is a UserError."""
        if self.encoder is not None and len(texts) >= 256 and self.workers > 1:
            # the tokenizer lets go of the GIL: a share of the texts per worker thread
            texts, step = list(texts), -(-len(texts) // self.workers)
            parts = self.pool.map(lambda part: self.encoder.encode(part, truncate),
                                  [texts[i:i + step] for i in range(0, len(texts), step)])
            ids = [row for part in parts for row in part]
        elif self.encoder is not None:
            ids = self.encoder.encode(texts, truncate)
        elif truncate:
            return tokenize(self.tokenizer, texts, self.max_length)
        else:
            ids = self.tokenizer(list(texts), truncation=False, padding=False, return_attention_mask=False,
                                 return_token_type_ids=False, verbose=False)["input_ids"]
        if not truncate:
            for i, row in enumerate(ids):
                if len(row) > self.max_length:
                    raise UserError(f"text {i} has {len(row)} tokens, more than this model's max_length of "
                                    f"{self.max_length}", hint="shorten it, or send truncate: true to cut it")
        return ids

    def logits_from_ids(self, ids: Sequence[Sequence[int]], *, here: bool = False) -> np.ndarray:
        """Logits (N, C) for token ids, in their order, the batches on the worker threads; with `here`,
        one after the other in the calling thread (the server's batcher calls it on a worker)."""
        if len(ids) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return run_batches(self.runner, ids, pad_id=self.pad_token_id, device=self.device,
                           batch_size=self.batch_size, max_tokens=self.max_tokens, pool=None if here else self.pool)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Logits (N, C) for texts; the temperature is already folded into them. NonFiniteOutput (a
        UserError) where the model gives NaN or inf: never a number that is not one."""
        return check_finite_output(self.logits_from_ids(self.encode(texts)), self.folder)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities (N, C) as float32; columns follow `labels`."""
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return softmax(self.logits(texts)).astype(np.float32)

    def agreement_with_fp32(self, texts: Sequence[str], probs: np.ndarray, *, sample: int = 200,
                            seed: int = 0) -> dict:
        """Re-score a random sample of `texts` in fp32 (`reference`); how far `probs` (from this
        predictor, rows following `texts`) are from it: argmax agreement and max |dp|."""
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(texts), size=min(sample, len(texts)), replace=False))
        ids = self.encode([texts[i] for i in pick])
        ref = softmax(run_batches(self.reference, ids, pad_id=self.pad_token_id, device=self.device,
                                  batch_size=64, max_tokens=MAX_TOKENS["fp32"], pool=self.pool))
        got = probs[pick]
        return {"sample": len(pick), "agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                "max_abs_dp": float(np.abs(got - ref).max()) if len(pick) else 0.0}


def fast_copy(model, precision: str, predictor: Predictor | None = None):
    """The model that runs: itself for fp32, else a converted copy (the original stays fp32).
    int8 on fastbert is calibrated on texts made from `predictor`'s vocabulary (see potluck.quantize)."""
    if precision == "bf16":
        runner = copy.deepcopy(model).to(torch.bfloat16).eval()
        return runner.pack() if isinstance(runner, FastBert) else runner
    if precision == "int8":
        if isinstance(model, FastBert):
            from potluck.quantize import calibration_texts, quantize_int8

            calibration = predictor.encode(calibration_texts(predictor.vocabulary())) if predictor else None
            return quantize_int8(model, calibration)
        return quantize_dynamic_int8(model)
    return model


def quantize_dynamic_int8(model):
    """torch's dynamic int8 (weights per output channel) for a model fastbert does not run.

    Returns a quantised copy; `model` is left as it was."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8, inplace=False)


def ranked(scores: np.ndarray, labels: Sequence[str], digits: int | None = 6) -> list[list[dict]]:
    """Per row of `scores` (N, C): every label with its score, highest first (ties in label order) — the
    answer shape of the CLI, the server and the commons' task serving (TEI's /predict)."""
    scores = np.asarray(scores, dtype=np.float64)
    return [[{"label": labels[j], "score": round(float(row[j]), digits) if digits is not None else float(row[j])}
             for j in np.argsort(-row, kind="stable")] for row in scores]


def check_finite_output(logits: np.ndarray, folder: Path | None = None) -> np.ndarray:
    """`logits`, or NonFiniteOutput naming the first text whose scores are NaN or inf."""
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        where = f"{folder}: " if folder is not None else ""
        raise NonFiniteOutput(f"{where}the model gave a non-finite score (NaN or inf) for text {int(np.argmax(bad))} "
                              f"({int(bad.sum())} of {len(logits)} texts)",
                              hint="its answers cannot be trusted: check or re-train the model")
    return logits


def load_checked(folder: Path):
    """transformers' AutoModelForSequenceClassification from a folder, refusing what it would otherwise
    patch up: a missing or mismatched tensor (initialised at random), an unused one, a non-finite value."""
    from transformers import AutoModelForSequenceClassification

    from potluck.folder import load_pretrained

    return load_pretrained(AutoModelForSequenceClassification, folder)[0]
