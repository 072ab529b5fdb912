"""The body tensors of a model folder, read lazily from its safetensors and checked against a base.

    from potluck.encoder_weights import WeightFile, base_model_prefix, check_compatible
    prefix = base_model_prefix("minilm")                      # "bert"
    base, model = WeightFile(resolve_base("minilm"), prefix), WeightFile("models/acme", prefix)
    check_compatible(base, [model])                           # UserError naming the file and tensor
    model.load("encoder.layer.0.attention.self.query.weight") # one tensor, NaN/inf refused

A fine-tuned `BertForSequenceClassification` stores its body under `bert.` and its head as
`classifier.*`; an MLM stores `cls.*`; a bare `BertModel` has no prefix. All are named here as in a
bare encoder, with head tensors set apart. Only headers are read until `load`; each `load` opens the
file for that read only, so nothing stays memory-mapped. Safetensors only: pickles are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from potluck.encoders import load_config
from potluck.errors import UserError
from potluck.folder import read_config, weight_files

HEAD_PREFIXES = ("classifier.", "cls.", "score.", "lm_head.", "qa_outputs.", "pre_classifier.",
                 "head.")  # "head.": the task head inside a commons contribution file
OPTIONAL_PREFIXES = ("pooler.",)  # masked-LM models have no pooler
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class WeightFile:
    """The body tensors of one model folder, read from its safetensors one tensor (or row block) at a time.

    Names are normalised to a bare encoder's: `bert.encoder.layer.0…` -> `encoder.layer.0…`; head tensors
    are left out and listed in `heads`. Only the header is read here.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str):
        from safetensors import SafetensorError

        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        if (self.folder / "config.json").exists():  # (a commons contribution is a weights file alone)
            read_config(self.folder)  # a broken config.json is a broken folder, even where only tensors are read
        stored: dict[str, tuple[Path, str, list[int]]] = {}
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        sliced = f.get_slice(key)
                        stored[key] = (path, sliced.get_dtype(), list(sliced.get_shape()))
            except (SafetensorError, OSError) as err:
                raise UserError(f"{path}: not a readable safetensors file ({err})",
                                hint="copy it again; a pickle renamed to .safetensors is never loaded") from None
        prefixed = any(key.startswith(prefix + ".") for key in stored)
        self.heads: list[str] = []
        self.body: dict[str, tuple[Path, str, str, list[int]]] = {}  # name -> (file, stored key, dtype, shape)
        for key, (path, dtype, shape) in stored.items():
            if prefixed and key.startswith(prefix + "."):
                self.body[key[len(prefix) + 1:]] = (path, key, dtype, shape)
            elif prefixed or key.startswith(HEAD_PREFIXES):
                self.heads.append(key)
            else:
                self.body[key] = (path, key, dtype, shape)

    def load(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One body tensor, or rows of it; the file is opened for this read only (nothing stays mapped)."""
        path, key, _, _ = self.body[name]
        with safe_open(path, framework="pt") as f:
            tensor = f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: tensor '{key}' has NaN or infinite values",
                            hint="this model cannot be fused; fine-tune it again or leave it out")
        return tensor

    def sha256(self) -> str:
        """sha256 of the weights (of all shards in order, for a sharded model)."""
        digest = hashlib.sha256()
        for path in self.files:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def base_model_prefix(base: str | os.PathLike) -> str:
    """The attribute under which task models keep the body (`bert` for BERT), from the base's config."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = load_config(base)
    try:
        return MODEL_MAPPING[type(config)].base_model_prefix
    except KeyError:
        return config.model_type


def check_compatible(base: WeightFile, inputs: Sequence[WeightFile]) -> None:
    """UserError naming the file and tensor when an input's body differs from the base's in name, shape or dtype."""
    for model in inputs:
        where = model.files[0]
        for name, (_, _, dtype, shape) in base.body.items():
            if dtype not in FLOAT_DTYPES:
                continue  # integer buffers (position_ids) come from the base
            if name not in model.body and not name.startswith(OPTIONAL_PREFIXES):
                raise UserError(f"{where}: tensor '{name}' of the base is missing",
                                hint="every model must be fine-tuned from the same base; check --base")
            if name not in model.body:
                continue
            _, key, got_dtype, got_shape = model.body[name]
            if got_shape != shape or got_dtype != dtype:
                raise UserError(f"{where}: tensor '{key}' is {got_dtype}{got_shape} but the base has {dtype}{shape}",
                                hint="every model must be fine-tuned from the same base; check --base")
        extra = [key for name, (_, key, dtype, _) in model.body.items()
                 if name not in base.body and dtype in FLOAT_DTYPES]
        if extra:
            raise UserError(f"{where}: tensor '{extra[0]}' is not in the base",
                            hint="every model must be fine-tuned from the same base; check --base")


DTYPE_NAMES = {**{v: k for k, v in FLOAT_DTYPES.items()}, torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in a fixed order known in advance.

    Written by hand because safetensors' own writers take every tensor at once (and `save_file` copies
    each to bytes first: two models in memory). The format is small: an 8-byte little-endian header
    length, a JSON header of name -> dtype, shape, [begin, end) offsets (padded with spaces to 8 bytes),
    then the tensors' bytes in offset order. Files written here are read back by `safe_open` in the tests.
    """

    def __init__(self, path: str | os.PathLike, specs: Sequence[tuple[str, str, list[int]]], metadata: dict):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.specs, self.done = list(specs), 0
        self.file = open(path, "wb")  # noqa: SIM115  (closed in close())
        self.file.write(struct.pack("<Q", len(text)) + text)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()  # the caller's atomic folder removes the partial file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor; its name, dtype and shape must be the next in the header."""
        expected = self.specs[self.done]
        got = (name, DTYPE_NAMES.get(tensor.dtype), list(tensor.shape))
        if got != (expected[0], expected[1], list(expected[2])):
            raise ValueError(f"expected {expected}, got {got}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
        self.file.write(memoryview(data.numpy()))
        self.done += 1

    def close(self) -> None:
        """Flush and fsync; every tensor of the header must have been written."""
        if self.done != len(self.specs):
            self.file.close()
            raise ValueError(f"{len(self.specs) - self.done} tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
