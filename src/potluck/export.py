"""ONNX export, and the ONNX Runtime runner behind `--backend onnx`.

    potluck export models/urgency --format onnx --out models/urgency-onnx [--int8]
    potluck predict models/urgency-onnx "The site is down" --backend onnx [--precision int8]

The export is the model folder again (config.json, safetensors, tokenizer, card, potluck.json) with
`onnx/model.onnx` added, where sentence-transformers and the Hugging Face hub keep theirs; `--int8`
adds `onnx/model_qint8.onnx` (ONNX Runtime's dynamic quantisation, weights per channel). The graph
comes from torch's TorchScript exporter (`dynamo=False`: the dynamo exporter gave BERT logits off by
up to 0.055, the TorchScript one matched to 5e-8) with the temperature already folded into the head,
so ONNX Runtime gives the calibrated probabilities. Every export is checked before it is kept: the
probabilities of ONNX Runtime and transformers on texts of many lengths must agree to 1e-4
(`onnx/export.json` records the difference).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from potluck.calibration import softmax
from potluck.errors import UserError
from potluck.hardware import Precision, say_once

logger = logging.getLogger(__name__)

OPSET = 17
FILES = {"fp32": "model.onnx", "int8": "model_qint8.onnx"}
TOLERANCE = 1e-4  # max |dp| between ONNX Runtime and transformers for an export to be kept


def export_onnx(folder: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
                overwrite: bool = False) -> dict:
    """Write the model folder `folder` again at `out` with onnx/model.onnx (and onnx/model_qint8.onnx
    with int8), checked against transformers; returns what onnx/export.json records. `out` may be
    `folder` itself (its onnx/ is added); another existing non-empty folder needs `overwrite`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from potluck.fastbert import FastTokenizer
    from potluck.fileio import atomic_folder
    from potluck.folder import max_length_of
    from potluck.quantize import calibration_texts

    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json)", hint="pass the --out folder of `potluck finetune`")
    same = out.resolve() == folder.resolve()
    if out.exists() and not same and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists and is not empty", hint="choose a new --out, or add --overwrite to replace it")
    if same and (folder / "onnx").exists() and not overwrite:
        raise UserError(f"{folder / 'onnx'} already exists", hint="add --overwrite to export again")
    tokenizer = FastTokenizer.from_folder(folder, max_length=max_length_of(folder))
    if tokenizer is None:
        raise UserError(f"{folder} has no tokenizer.json", hint="the ONNX backend tokenizes with the folder's tokenizer.json")
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                               attn_implementation="eager").eval()
    texts = calibration_texts(list(tokenizer.whole.get_vocab()), n=96, seed=1)
    rows = tokenizer.encode(texts + ["word " * 600])  # lengths from a few tokens to max_length
    with atomic_folder(out, overwrite=True) as tmp:  # checked above
        for item in folder.iterdir():
            if item.is_file() and item.name != ".lock":
                shutil.copy2(item, tmp / item.name)
        (tmp / "onnx").mkdir()
        ids, mask = _padded(rows[:2], tokenizer.pad_token_id)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow: the check below decides
            torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp / "onnx" / FILES["fp32"]),
                              dynamo=False, opset_version=OPSET, input_names=["input_ids", "attention_mask"],
                              output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})
        want = softmax(_torch_logits(model, rows, tokenizer.pad_token_id))
        got = softmax(OnnxRunner(tmp / "onnx" / FILES["fp32"], ["?"] * want.shape[1], tokenizer.pad_token_id,
                                  Precision("fp32", "fp32")).classify(rows))
        record = {"opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__,
                  "checked_on_texts": len(rows), "max_abs_dp_vs_transformers": float(np.abs(got - want).max())}
        if record["max_abs_dp_vs_transformers"] > TOLERANCE:
            raise RuntimeError(f"the ONNX export differs from transformers by {record['max_abs_dp_vs_transformers']:.2g} "
                               f"(tolerance {TOLERANCE}); not written")
        if int8:
            record["int8"] = _quantize(tmp / "onnx", rows, want, tokenizer.pad_token_id)
        (tmp / "onnx" / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _quantize(onnx_dir: Path, rows, want: np.ndarray, pad_id: int) -> dict:
    """onnx/model_qint8.onnx from onnx/model.onnx; its agreement with fp32 on `rows`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # the quantizer logs advice on pre-processing to the root logger
    try:
        quantize_dynamic(onnx_dir / FILES["fp32"], onnx_dir / FILES["int8"], weight_type=QuantType.QInt8,
                         per_channel=True)
    finally:
        root.setLevel(level)
    got = softmax(OnnxRunner(onnx_dir / FILES["int8"], ["?"] * want.shape[1], pad_id,
                              Precision("int8", "int8")).classify(rows))
    return {"method": "onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)",
            "agreement_with_fp32": float(np.mean(got.argmax(1) == want.argmax(1))),
            "max_abs_dp_vs_fp32": float(np.abs(got - want).max())}


class OnnxRunner:
    """An exported model on ONNX Runtime's CPU provider: `classify(rows)` gives logits (N, C) float32 for
    token-id rows, like FastBert. One session serves every worker thread (its `run` is thread-safe), each
    call on `threads` threads."""

    def __init__(self, path: str | os.PathLike, labels: Sequence[str], pad_id: int, plan: Precision, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.labels, self.num_labels = list(labels), len(labels)
        self.pad_id, self.plan, self.path = pad_id, plan, Path(path)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, precision: str = "auto", threads: int = 1) -> OnnxRunner:
        """The runner for an exported folder: onnx/model.onnx, or onnx/model_qint8.onnx for int8."""
        from potluck.fastbert import FastTokenizer

        folder = Path(folder)
        plan = _plan(precision)
        path = folder / "onnx" / FILES[plan.used]
        if not path.is_file():
            flag = (" --int8" if plan.used == "int8" else "") + (" --overwrite" if path.parent.exists() else "")
            raise UserError(f"{folder} has no {path.relative_to(folder)}",
                            hint=f"export it first: potluck export {folder} --format onnx --out {folder}{flag}")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("the ONNX backend needs onnxruntime", hint="pip install 'potluck[onnx]'") from None
        config = json.loads((folder / "config.json").read_text())
        id2label = {int(i): label for i, label in config["id2label"].items()}
        tokenizer = FastTokenizer.from_folder(folder, max_length=8)
        if tokenizer is None:
            raise UserError(f"{folder} has no tokenizer.json", hint="export the folder again with `potluck export`")
        return cls(path, [id2label[i] for i in range(len(id2label))], tokenizer.pad_token_id, plan, threads)

    def classify(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, self.num_labels), dtype=np.float32)
        ids, mask = _padded(rows, self.pad_id)  # (B, T) each
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(["logits"], feed)[0].astype(np.float32, copy=False)  # (B, C)


def _plan(asked: str) -> Precision:
    """ONNX Runtime on a CPU runs fp32 or int8 here; bf16 and auto run fp32 (its int8 agreed with fp32
    on 98.8 % of the benchmark's labels on an AVX2 EPYC: below the 99.5 % that auto keeps)."""
    if asked in ("fp32", "int8"):
        return Precision(asked, asked)
    if asked == "bf16":
        plan = Precision(asked, "fp32", "bf16 asked, running fp32 instead: the ONNX backend runs fp32 or int8 "
                                        "(bf16 runs on the torch backend)")
        say_once(plan.note)
        return plan
    return Precision(asked, "fp32")


def _padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(rows), longest), dtype=np.int64)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def _torch_logits(model, rows, pad_id: int, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            ids, mask = _padded(rows[start:start + batch], pad_id)
            out.append(model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy())
    return np.concatenate(out)


