"""Checks on arrival: a weights contribution or a dataset is accepted only if every check passes.

    checked = check_weights(path, task=task, base_of=registry.base, store=store, limits=limits)
    train, held_back, details = check_dataset(path, task=task, eval_fraction=0.2, eval_only=False)

Weights: the safetensors header is read with `safetensors.safe_open` (never a pickle), within size
limits; the declared base version must exist and its sha256 match; every body tensor's name, shape and
dtype must match the base; the head must be exactly the head a model fine-tuned from that base has for the
declared labels (names and shapes, `formats.head_spec`: an extra tensor under `head.` would be stored and
handed out unchecked); every value must be finite. Tensors are read one slice at a time, so checking a
90 MB MiniLM contribution holds only a few MB at once. Any failure raises `Rejected` with the reason, which
the API records and returns.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from potluck.commons.errors import CommonsError, NotFound, Rejected
from potluck.commons.formats import CONTRIBUTION_FORMAT, HEAD_PREFIX, head_spec, read_manifest
from potluck.commons.registry import check_metrics
from potluck.commons.settings import WeightLimits

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SLICE_ELEMENTS = 1 << 20  # values checked at a time


@dataclass
class CheckedWeights:
    base_version: int
    labels: list[str]
    n_examples: int
    metrics: dict
    head: list[str]
    details: dict


def _shown(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_header(path: Path, limits: WeightLimits):
    """Open the file with safetensors after checking the header's declared size; Rejected if not safetensors."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise Rejected("not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > path.stat().st_size - 8:
        raise Rejected(f"not a valid safetensors file (its header claims {n} bytes, more than the file holds)")
    if n > limits.max_header_bytes:
        raise Rejected(f"the safetensors header is {n} bytes, over the limit of {limits.max_header_bytes}",
                       status=413)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError and friends: the file is not valid safetensors
        raise Rejected(f"not a valid safetensors file ({err})") from None


def read_metadata(meta: dict | None) -> tuple[int, str, list[str], int, dict]:
    """(base_version, base_sha256, labels, n_examples, metrics) from a contribution's metadata."""
    meta = meta or {}
    if meta.get("format") != CONTRIBUTION_FORMAT:
        raise Rejected(f"the file's metadata does not say format={CONTRIBUTION_FORMAT}: push it with "
                       "`potluck commons push` or a worker")
    try:
        base_version, base_sha = int(meta["base_version"]), str(meta["base_sha256"])
        labels, n_examples = json.loads(meta["labels"]), int(meta["n_examples"])
        metrics = check_metrics(json.loads(meta.get("metrics") or "{}"))
    except (KeyError, ValueError, TypeError, CommonsError) as err:
        raise Rejected(f"malformed contribution metadata ({err.__class__.__name__}: {err})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise Rejected("malformed contribution metadata: labels must be a list of strings")
    if not 1 <= n_examples <= 10**9:
        raise Rejected(f"n_examples must be between 1 and 10^9, not {n_examples}")
    return base_version, base_sha, labels, n_examples, metrics


def check_weights(path: Path, *, task, base_of: Callable, store, limits: WeightLimits) -> CheckedWeights:
    """Every check on a weights contribution, cheapest first; raises Rejected with the first failure."""
    with read_header(path, limits) as f:
        version, declared_sha, labels, n_examples, metrics = read_metadata(f.metadata())
        try:
            base = base_of(version)
        except NotFound:
            raise Rejected(f"declared base version {version} does not exist in this commons",
                           base_version=version) from None
        if declared_sha != base.weights_sha:
            raise Rejected(f"declared base hash {declared_sha[:16]}… does not match base version {version} "
                           f"({base.weights_sha[:16]}…): the model was fine-tuned from other weights",
                           base_version=version)
        try:
            names = list(f.keys())
            if len(names) > limits.max_tensors:
                raise Rejected(f"{len(names)} tensors, over the limit of {limits.max_tensors}", status=413)
            head = [n for n in names if n.startswith(HEAD_PREFIX)]
            check_body(f, [n for n in names if not n.startswith(HEAD_PREFIX)], base.spec)
            check_head(f, head, labels, task, limits)
            check_head_fits(f, head, expected_head(store, base, len(labels)), len(labels), version)
            details = check_values(f, names, store.path(base.weights_sha), base.spec)
        except Rejected as err:
            err.base_version = version
            raise
    return CheckedWeights(version, labels, n_examples, metrics, head, details)


def check_body(f, body: list[str], spec: dict) -> None:
    """The encoder body has exactly the base's tensors, each with the base's shape and dtype."""
    missing, unexpected = set(spec) - set(body), set(body) - set(spec)
    if missing:
        raise Rejected(f"missing tensor(s) of the base: {_shown(missing)}")
    if unexpected:
        raise Rejected(f"unexpected tensor(s) not in the base: {_shown(unexpected)} (head tensors go under "
                       f"'{HEAD_PREFIX}')")
    for name in body:
        tensor = f.get_slice(name)
        dtype, shape = tensor.get_dtype(), list(tensor.get_shape())
        want_dtype, want_shape = spec[name]
        if shape != list(want_shape):
            raise Rejected(f"tensor {name!r} has shape {shape} but the base has {list(want_shape)}")
        if dtype != want_dtype:
            raise Rejected(f"tensor {name!r} has dtype {dtype} but the base has {want_dtype}")


def check_head(f, head: list[str], labels: list[str], task, limits: WeightLimits) -> None:
    """The model's labels are the task's; a head exists, is floating point and within size limits."""
    if len(set(labels)) != len(labels) or len(labels) < 2 or not set(labels) <= set(task.labels):
        raise Rejected(f"the model's labels {labels} are not two or more distinct labels of task "
                       f"{task.name!r} ({task.labels})")
    if not head:
        raise Rejected(f"no task head: its tensors go under '{HEAD_PREFIX}'")
    if len(head) > limits.max_head_tensors:
        raise Rejected(f"{len(head)} head tensors, over the limit of {limits.max_head_tensors}", status=413)
    shapes = {name: list(f.get_slice(name).get_shape()) for name in head}
    params = sum(math.prod(shape) for shape in shapes.values())
    if params > limits.max_head_params:
        raise Rejected(f"the head has {params} values, over the limit of {limits.max_head_params}", status=413)
    for name in head:
        if f.get_slice(name).get_dtype() not in FLOAT_DTYPES:
            raise Rejected(f"head tensor {name!r} is {f.get_slice(name).get_dtype()}, not floating point")


def expected_head(store, base, n_labels: int) -> dict[str, list[int]]:
    """The head ('head.' name -> shape) a model fine-tuned from `base` has for `n_labels` labels."""
    manifest = read_manifest(store.read_bytes(base.manifest_sha))
    config = json.loads(store.read_bytes(manifest["files"]["config.json"]))
    try:
        return head_spec(config, n_labels, set(base.spec))
    except (ValueError, KeyError, TypeError, OSError) as err:  # an architecture transformers cannot classify with
        raise Rejected(f"the commons cannot tell which head fits base version {base.version} "
                       f"({err.__class__.__name__}: {str(err)[:200]}); tell its admin") from None


def check_head_fits(f, head: list[str], expected: dict[str, list[int]], n_labels: int, version: int) -> None:
    """Exactly the expected head tensors, each of the expected shape: anything else under 'head.' is refused."""
    unexpected, missing = set(head) - set(expected), set(expected) - set(head)
    if unexpected:
        raise Rejected(f"unexpected head tensor(s) {_shown(unexpected)}: a {n_labels}-label head on base "
                       f"version {version} has exactly {_shown(expected, 6)}")
    if missing:
        raise Rejected(f"missing head tensor(s) {_shown(missing)} of a {n_labels}-label head on base "
                       f"version {version}")
    for name in head:
        shape = list(f.get_slice(name).get_shape())
        if shape != expected[name]:
            raise Rejected(f"head tensor {name!r} has shape {shape}, but a head with {n_labels} output rows "
                           f"(one per label) on base version {version} has {expected[name]}")


def _row_slices(shape: list[int]):
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, SLICE_ELEMENTS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _norm(values) -> float:
    """The L2 norm of a float tensor; NaN or infinity when a value is not finite."""
    import torch

    norm = float(torch.linalg.vector_norm(values))
    if math.isfinite(norm):
        return norm  # a NaN or an infinity anywhere would have made it non-finite
    bad = values.numel() - int(torch.isfinite(values).sum())  # the exact (slower) count
    if bad:
        return math.nan
    return float(torch.linalg.vector_norm(values.double()))  # finite but huge: float32 overflowed


def check_values(f, names: list[str], base_path: Path, spec: dict) -> dict:
    """Every value is finite; also measure how far the body moved from the base (for fusion and the card).

    Row blocks of about a million values are read at a time; a block's L2 norm is finite exactly when all
    its values are (float32 overflow aside, which is re-checked), which is ~10x faster than isfinite().
    """
    from safetensors import safe_open

    moved = total = 0.0
    largest = ("", 0.0)
    with safe_open(str(base_path), framework="pt") as base:
        for name in names:
            tensor, shape = f.get_slice(name), list(f.get_slice(name).get_shape())
            if tensor.get_dtype() not in FLOAT_DTYPES:
                continue
            in_base = name in spec
            diff = norm = 0.0
            for rows in _row_slices(shape):
                part = (tensor[rows] if shape else f.get_tensor(name)).float()  # (rows, ...)
                if not math.isfinite(_norm(part)):
                    raise Rejected(f"tensor {name!r} has non-finite value(s) (NaN or infinity)")
                if in_base:
                    ref = (base.get_slice(name)[rows] if shape else base.get_tensor(name)).float()
                    diff += _norm(part - ref) ** 2
                    norm += _norm(ref) ** 2
            if in_base:
                moved, total = moved + diff, total + norm
                relative = math.sqrt(diff / norm) if norm else 0.0
                largest = max(largest, (name, relative), key=lambda x: x[1])
    return {"relative_change": math.sqrt(moved / total) if total else 0.0,
            "largest_change": {"tensor": largest[0], "relative": largest[1]}}


def check_dataset(path: Path, *, task, eval_fraction: float, eval_only: bool, seed: int = 0):
    """Parse a shared dataset (JSONL of text and label) with `potluck finetune`'s checks and split it.

    Returns (train part or None for --eval-only, held-back evaluation part, details); Rejected otherwise.
    """
    from potluck.data import DataError, check_training_data, read_data
    from potluck.splits import stratified_split

    if not 0.05 <= eval_fraction <= 0.5:
        raise Rejected(f"eval_fraction must be between 0.05 and 0.5, not {eval_fraction}")
    try:
        data = read_data(path, "text", "label")
        warnings = [w.replace(str(path), "dataset") for w in check_training_data(data)]
        unknown = sorted(set(data.labels) - set(task.labels))
        if unknown:
            raise Rejected(f"label(s) {_shown(unknown)} are not labels of task {task.name!r} ({task.labels})")
        train, held = (None, data) if eval_only else stratified_split(data, eval_fraction, seed=seed)
    except DataError as err:  # name the upload, not the server's temp file
        raise Rejected(str(DataError(err.message, path="dataset", line=err.line, column=err.column,
                                     hint=err.hint))) from None
    details = {"label_counts": data.label_counts(), "fingerprint": data.fingerprint(), "warnings": warnings,
               "eval_fraction": None if eval_only else eval_fraction}
    return train, held, details


def to_jsonl(data) -> bytes:
    """A LabelledData as JSONL bytes ({"text", "label"} per line): how datasets are stored and sent."""
    return "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n"
                   for t, y in zip(data.texts, data.labels, strict=True)).encode("utf-8")
