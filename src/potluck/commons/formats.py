"""The commons' file formats: the base bundle and the contribution file.

A base bundle is a Hugging Face encoder folder kept file by file in the blob store, plus a manifest
(itself a blob) that lists them::

    {"format": "potluck.base/1", "weights": "model.safetensors",
     "files": {"config.json": "<sha256>", "model.safetensors": "<sha256>", "tokenizer.json": "<sha256>", ...}}

Only plain file names and safe kinds are kept: the weights as safetensors, config and tokenizer files as
JSON or text. No archive is ever unpacked and nothing is unpickled. A pulled folder carries
`commons.json` and a `potluck_commons` entry in its config.json (version, weights sha256, commons URL);
transformers keeps that entry through `potluck finetune`, so `push` knows which base a model came from.

A contribution file is one safetensors file: the encoder body under the base's own tensor names, the task
head under `head.`, and metadata strings saying what it is (format, base_version, base_sha256, labels,
n_examples, metrics, task).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from potluck.errors import UserError
from potluck.fileio import atomic_write_json

logger = logging.getLogger(__name__)

BASE_FORMAT = "potluck.base/1"
CONTRIBUTION_FORMAT = "potluck.contribution/1"
WEIGHTS_FILE = "model.safetensors"
HEAD_PREFIX = "head."
MARKER = "commons.json"
CONFIG_KEY = "potluck_commons"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAFE_SUFFIXES = (".json", ".txt", ".model")  # config and tokenizer files (a sentencepiece .model is protobuf)


def safe_file_name(name: str) -> bool:
    """A bundle may hold `model.safetensors` and plain-named JSON / text tokenizer files, nothing else."""
    return bool(SAFE_NAME.match(name)) and (name == WEIGHTS_FILE or name.endswith(SAFE_SUFFIXES))


def export_encoder(source: str | os.PathLike, folder: Path) -> None:
    """Write the encoder body of `source` ('minilm', a folder, a hub id) as a clean folder.

    Loading with `AutoModel` drops any task head and any `bert.`-style prefix, so the weights carry the
    body's own tensor names; saving writes config.json and one model.safetensors, and the tokenizer is
    saved beside them.
    """
    from transformers import AutoModel

    from potluck.encoders import load_tokenizer, resolve_base
    from potluck.folder import HEADS, load_pretrained

    model, _ = load_pretrained(AutoModel, resolve_base(source), name=f"base '{source}'", may_lack=("pooler.",),
                               may_add=HEADS)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(source).save_pretrained(folder)


def tensor_spec(path: str | os.PathLike) -> dict[str, list]:
    """Tensor name -> [dtype, shape] from a safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        spec = {}
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor_slice = f.get_slice(name)
            spec[name] = [tensor_slice.get_dtype(), list(tensor_slice.get_shape())]
    return spec


def store_base_folder(store, folder: Path) -> tuple[str, str, dict]:
    """Store every safe file of an encoder folder as a blob; return (manifest sha, weights sha, spec)."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and safe_file_name(path.name):
            files[path.name] = store.put_file(path)
        else:
            logger.info("not bundling %s (only safetensors weights and JSON/text files are kept)", path.name)
    for needed in (WEIGHTS_FILE, "config.json"):
        if needed not in files:
            raise UserError(f"{folder} has no {needed}", hint="export the encoder with save_pretrained first")
    return store_manifest(store, files)


def store_base_weights(store, parent_manifest: dict, weights_path: str | os.PathLike) -> tuple[str, str, dict]:
    """A new base from new weights and the parent's config and tokenizer (what a fusion round makes)."""
    files = dict(parent_manifest["files"], **{WEIGHTS_FILE: store.put_file(weights_path)})
    return store_manifest(store, files)


def store_manifest(store, files: dict[str, str]) -> tuple[str, str, dict]:
    manifest = {"format": BASE_FORMAT, "weights": WEIGHTS_FILE, "files": dict(sorted(files.items()))}
    manifest_sha = store.put_bytes(json.dumps(manifest, sort_keys=True).encode("utf-8"))
    weights_sha = files[WEIGHTS_FILE]
    return manifest_sha, weights_sha, tensor_spec(store.path(weights_sha))


def read_manifest(data: bytes) -> dict:
    """Parse and check a bundle manifest (from the store or from the server)."""
    manifest = json.loads(data)
    if manifest.get("format") != BASE_FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a potluck base manifest")
    for name, sha in manifest["files"].items():
        if not safe_file_name(name) or not re.fullmatch(r"[0-9a-f]{64}", str(sha)):
            raise ValueError(f"unsafe entry in a base manifest: {name!r}")
    return manifest


def mark_pulled(folder: Path, info: dict) -> None:
    """Record in a pulled folder which commons base it is: commons.json, and config.json's potluck_commons."""
    atomic_write_json(folder / MARKER, info)
    config = json.loads((folder / "config.json").read_text())
    config[CONFIG_KEY] = info
    atomic_write_json(folder / "config.json", config)


# -- contribution files ----------------------------------------------------------------------------


def split_state(keys: Iterable[str], base_names: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Map a fine-tuned model's tensor names to (body: base name -> key, head: 'head.' + key -> key).

    The body is found by the prefix that makes the most names match the base's (`bert.` for a
    BertForSequenceClassification, none for a bare encoder); every other tensor belongs to the head.
    """
    keys = list(keys)
    prefixes = [""] + sorted({key.split(".", 1)[0] + "." for key in keys if "." in key})
    best = max(prefixes, key=lambda p: sum(k.startswith(p) and k[len(p):] in base_names for k in keys))
    body = {k[len(best):]: k for k in keys if k.startswith(best) and k[len(best):] in base_names}
    taken = set(body.values())
    head = {HEAD_PREFIX + k: k for k in keys if k not in taken}
    return body, head


def head_spec(config: dict, n_labels: int, base_names: set[str]) -> dict[str, list[int]]:
    """The task head a model fine-tuned from a base with `config` has for `n_labels` labels: 'head.' name -> shape.

    It is the head `AutoModelForSequenceClassification` builds on that base (what `potluck finetune` trains
    and what task serving loads), split from the body as `write_contribution` splits it, so a pushed file
    may carry exactly these tensors under 'head.' and nothing else. Built on the meta device: no memory.
    """
    shapes = _classifier_shapes(json.dumps(config, sort_keys=True), n_labels)
    _, head = split_state(shapes, base_names)
    return {name: list(shapes[key]) for name, key in head.items()}


@functools.lru_cache(maxsize=32)
def _classifier_shapes(config_json: str, n_labels: int) -> dict[str, list[int]]:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    values = json.loads(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.num_labels = n_labels  # also resets id2label to n_labels entries
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def contribution_metadata(*, base_version: int, base_sha256: str, labels: list[str], n_examples: int,
                          metrics: dict, task: str) -> dict[str, str]:
    return {"format": CONTRIBUTION_FORMAT, "base_version": str(base_version), "base_sha256": base_sha256,
            "labels": json.dumps(list(labels)), "n_examples": str(int(n_examples)),
            "metrics": json.dumps(metrics), "task": task}


def write_contribution(tensors: Mapping[str, Any], base_names: set[str], metadata: dict[str, str],
                       path: str | os.PathLike) -> dict[str, int]:
    """Write body (base names) + head ('head.' names) of a fine-tuned model's tensors as one safetensors file."""
    from safetensors.torch import save_file

    body, head = split_state(tensors.keys(), base_names)
    missing = sorted(base_names - set(body))
    if missing:
        raise UserError(f"the model does not have the base's tensor {missing[0]!r} ({len(missing)} missing)",
                        hint="push a model fine-tuned from a base pulled from this commons")
    if not head:
        raise UserError("the model has no classification head", hint="push a folder written by potluck finetune")
    out = {name: tensors[key].detach().contiguous() for name, key in {**body, **head}.items()}
    save_file(out, os.fspath(path), metadata=metadata)
    return {"body_tensors": len(body), "head_tensors": len(head)}


def model_provenance(folder: Path) -> dict:
    """What a fine-tuned model folder says about itself: labels, base it came from, examples, metrics."""
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a model folder (no config.json or model.safetensors)",
                        hint="pass the --out folder of `potluck finetune`")
    from potluck.folder import RESAVE, read_config, read_meta

    config = read_config(folder)
    meta = read_meta(folder)
    try:
        id2label = config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{folder / 'config.json'}: id2label is malformed ({err})", hint=RESAVE) from None
    valid = (meta.get("metrics") or {}).get("valid") or {}
    return {"labels": labels, "commons": config.get(CONFIG_KEY),
            "n_examples": int((meta.get("data") or {}).get("n_train") or 0),
            "metrics": {k: float(v) for k, v in valid.items() if isinstance(v, int | float)}}
