"""Fuse the encoder bodies of models fine-tuned from one base into a new base encoder.

    potluck fuse models/a models/b models/c --out fused/ --method ties
    potluck finetune --base fused/ --data tickets.csv --out models/tickets     # use it as any base

    from potluck.fusion import fuse, FusionSettings
    fuse(["models/a", "models/b", "models/c"], "fused/", settings=FusionSettings(method="median"))

Methods, coordinate by coordinate over the N inputs θ_1..θ_N (all fine-tuned from the base θ_0):
  mean          Σ w_i θ_i with w ∝ 1 (equal) or ∝ training-example count (examples)
  trimmed-mean  drop the k largest and k smallest values, average the rest; k = ⌈trim·N⌉, at most (N−1)//2
  median        the middle value (the mean of the two middle ones for even N)
  ties          TIES-merging (Yadav et al., 2023) on task vectors τ_i = θ_i − θ_0: keep the ⌈density·n⌉
                largest |τ_i| of each tensor (per tensor, as mergekit does, so it streams), elect each
                coordinate's sign as sgn(Σ_i τ̂_i), average only the kept entries that agree with it,
                θ = θ_0 + scale·τ_merged

Heads are never fused: a fine-tuned `BertForSequenceClassification` stores its body under `bert.` and
its head as `classifier.*`; an MLM stores `cls.*`. Only body tensors are read, named as in a bare
encoder (`embeddings.…`, `encoder.layer.…`, `pooler.…`), and the output is a bare encoder folder.
Non-float buffers (e.g. `position_ids`) are copied from the base. A masked-LM input has no pooler: the
pooler is fused over the inputs that have one (the base's is kept when none has).

Memory: tensors are read one at a time from each input (`safe_open`, re-opened per read so nothing stays
mapped) and the fused tensor goes straight to disk (`SafetensorsWriter`). Mean and ties hold one input
tensor at a time plus a few float32 work tensors of that size; trimmed-mean and median read row blocks of
every input, sized to `working_mib`. So the peak does not grow with N; it is set by the largest tensor
(MiniLM's word embeddings, 47 MB). All arithmetic is float32; the output has the base's dtypes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from potluck.encoder_weights import (
    FLOAT_DTYPES,
    SafetensorsWriter,
    WeightFile,
    base_model_prefix,
    check_compatible,
    weight_files,
)
from potluck.encoders import load_config, load_tokenizer, resolve_base
from potluck.errors import UserError, require
from potluck.folder import new_meta, read_meta, write_folder

logger = logging.getLogger(__name__)

METHODS = ("mean", "trimmed-mean", "median", "ties")
WEIGHTINGS = ("equal", "examples")


@dataclass
class FusionSettings:
    """How to fuse. Which models and which base are arguments of `fuse`, not settings."""

    method: str = field(default="mean", metadata={"help": "'mean', 'trimmed-mean', 'median' or 'ties'"})
    weights: str = field(default="equal", metadata={
        "help": "mean only: 'equal', or 'examples' (each model weighted by its training-example count)"})
    trim: float = field(default=0.2, metadata={
        "help": "trimmed-mean: share dropped at each end per coordinate (k = ceil(trim*N), at most (N-1)/2)"})
    density: float = field(default=0.2, metadata={
        "help": "ties: share of each task vector kept, largest magnitudes first, per tensor"})
    scale: float = field(default=1.0, metadata={"help": "ties: lambda, the scale of the merged task vector"})
    working_mib: int = field(default=64, metadata={
        "help": "memory for the row blocks of trimmed-mean and median, in MiB"})

    def __post_init__(self):
        require(
            (self.method in METHODS, f"unknown fusion method '{self.method}'", f"use one of {', '.join(METHODS)}"),
            (self.weights in WEIGHTINGS, f"unknown weights '{self.weights}'", "use 'equal' or 'examples'"),
            (self.weights == "equal" or self.method == "mean", f"--weights {self.weights} applies to the mean only",
             "robust methods (trimmed-mean, median, ties) weigh every model equally; drop --weights"),
            (0 <= self.trim < 0.5, f"trim must be in [0, 0.5), got {self.trim}", "e.g. --trim 0.2"),
            (0 < self.density <= 1, f"density must be in (0, 1], got {self.density}", "e.g. --density 0.2"),
            (math.isfinite(self.scale) and self.scale > 0, f"scale must be positive, got {self.scale}",
             "e.g. --scale 1.0"),
            (self.working_mib >= 1, "working_mib must be at least 1", "e.g. --working-mib 64"),
        )


# -- the arithmetic, on tensors -------------------------------------------------------------------

def trim_count(n: int, trim: float) -> int:
    """How many values trimmed-mean drops at each end of N: ⌈trim·N⌉, leaving at least one value."""
    return min(math.ceil(trim * n - 1e-9), (n - 1) // 2)


def weighted_mean(load: Callable[[int], torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i x_i with w normalised to sum 1, reading one input at a time."""
    total = float(sum(weights))
    acc = None
    for i, w in enumerate(weights):
        x = load(i).float()
        acc = x * (w / total) if acc is None else acc.add_(x, alpha=w / total)
        del x  # one input in memory at a time
    return acc


def trimmed_mean(stack: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinate-wise mean of stack (N, ...) after dropping its k smallest and k largest values."""
    n = stack.shape[0]
    if k == 0:
        return stack.float().mean(dim=0)
    ordered = stack.float().sort(dim=0).values  # (N, ...)
    return ordered[k:n - k].mean(dim=0)


def median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of stack (N, ...); for even N the mean of the two middle values."""
    n = stack.shape[0]
    ordered = stack.float().sort(dim=0).values  # (N, ...)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ties_threshold(tau: torch.Tensor, density: float) -> float:
    """The smallest |τ| that TIES keeps: the ⌈density·n⌉-th largest magnitude (ties at it are kept)."""
    n = tau.numel()
    keep = math.ceil(density * n - 1e-9)
    if keep >= n:
        return 0.0
    return float(tau.abs().flatten().kthvalue(n - keep + 1).values)


def ties_merge(load: Callable[[int], torch.Tensor], n: int, base: torch.Tensor, *, density: float,
               scale: float, on_task_vector: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """TIES-merging of one tensor in two passes over the inputs, one input in memory at a time."""
    base = base.float()
    mass = torch.zeros_like(base)  # Σ_i τ̂_i
    thresholds = []
    for i in range(n):
        tau = load(i).float() - base
        if on_task_vector:
            on_task_vector(i, tau)
        thresholds.append(ties_threshold(tau, density))
        mass += tau.masked_fill_(tau.abs() < thresholds[i], 0.0)  # τ̂_i: the trimmed task vector
        del tau
    elected = mass.sign_()  # in place: mass is not needed any more
    total = torch.zeros_like(base)
    count = torch.zeros(base.shape, dtype=torch.int32)
    for i in range(n):
        tau = load(i).float() - base
        agree = tau.abs() >= thresholds[i]
        agree &= tau != 0
        agree &= tau.sign() == elected
        total += tau.masked_fill_(~agree, 0.0)
        count += agree
        del tau, agree
    return total.div_(count.clamp_(min=1)).mul_(scale).add_(base)


def fuse_tensors(tensors: Sequence[torch.Tensor], *, method: str, base: torch.Tensor | None = None,
                 weights: Sequence[float] | None = None, trim: float = 0.2, density: float = 0.2,
                 scale: float = 1.0) -> torch.Tensor:
    """Fuse one tensor of each of N models (float32 result); the same functions `fuse` streams with."""
    n = len(tensors)
    if method == "mean":
        return weighted_mean(lambda i: tensors[i], weights or [1.0] * n)
    if method in ("trimmed-mean", "median"):
        stack = torch.stack([t.float() for t in tensors])  # (N, ...)
        return median(stack) if method == "median" else trimmed_mean(stack, trim_count(n, trim))
    if method == "ties":
        if base is None:
            raise ValueError("ties needs the base tensor")
        return ties_merge(lambda i: tensors[i], n, base, density=density, scale=scale)
    raise ValueError(f"unknown method {method!r}")


def row_blocks(shape: Sequence[int], n: int, working_bytes: int) -> list[slice | None]:
    """Row ranges of a tensor such that N blocks, sorted (values + int64 indices), fit in working_bytes."""
    if not shape:
        return [None]
    per_row = max(1, math.prod(shape[1:])) * n * 20  # float32 stack, difference, sorted values; int64 indices
    step = max(1, working_bytes // per_row)
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


# -- fusing model folders -------------------------------------------------------------------------

@dataclass
class FusionResult:
    """What `fuse` did: where the encoder went, and how far each input moved from the base."""

    out: Path
    method: str
    n_inputs: int
    n_tensors: int
    heads_left_out: list[int]  # head tensors left out, per input
    task_vector_norms: list[float]  # ‖θ_i − θ_base‖ / ‖θ_base‖ per input: an outlier stands out
    seconds: float
    meta: dict


def fuse(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, base: str | os.PathLike | None = None,
         settings: FusionSettings | None = None, weights: Sequence[float] | None = None,
         command: str | None = None, overwrite: bool = False) -> FusionResult:
    """Fuse the bodies of `models` (fine-tuned from `base`) into an encoder folder at `out`, atomically.

    `base` defaults to the base recorded in the models' potluck.json (they must agree). `weights`
    (mean only) overrides `settings.weights` with explicit numbers, e.g. example counts the commons knows.
    """
    settings = settings or FusionSettings()
    if not models:
        raise UserError("no models to fuse", hint="pass two or more model folders")
    folders = [Path(m) for m in models]
    for folder in folders:
        weight_files(folder)
    base_name = str(base) if base is not None else recorded_base(folders)
    base_path = Path(resolve_base(base_name))
    if not base_path.is_dir():
        raise UserError(f"base '{base_name}' is not a local folder", hint="pass --base with a model folder or 'minilm'")
    if Path(out).resolve() in {f.resolve() for f in [*folders, base_path]}:
        raise UserError(f"--out {out} is one of the models or the base", hint="write the fused encoder elsewhere")
    w = model_weights(folders, settings, weights)
    start = time.perf_counter()
    prefix = base_model_prefix(base_path)
    base_file = WeightFile(base_path, prefix)
    inputs = [WeightFile(folder, prefix) for folder in folders]
    check_compatible(base_file, inputs)
    specs = [(name, dtype, shape) for name, (_, _, dtype, shape) in base_file.body.items()]
    sq_dist, sq_base = np.zeros(len(inputs)), 0.0
    norms: list[float] = []

    def fill(tmp: Path) -> None:  # the fused tensors, one at a time straight to disk; config and tokenizer
        nonlocal sq_base
        with SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"}) as writer:
            for name, dtype, _ in specs:
                base_tensor = base_file.load(name)
                if dtype not in FLOAT_DTYPES:
                    writer.write(name, base_tensor)  # integer buffers (position_ids) come from the base
                    continue
                sq_base += squared_norm(base_tensor)
                members = [i for i, m in enumerate(inputs) if name in m.body]  # all, but an MLM has no pooler
                if not members:
                    writer.write(name, base_tensor)
                    continue
                tensor, sq = fuse_one(name, base_tensor, [inputs[i] for i in members], settings,
                                      [w[i] for i in members])
                sq_dist[members] += sq
                writer.write(name, tensor.to(base_tensor.dtype))
                del tensor, base_tensor
        norms.extend(float(np.sqrt(d / max(sq_base, 1e-30))) for d in sq_dist)
        meta.update(fusion_metadata(base_name, base_file, inputs, settings, w, norms, command))
        write_encoder_config(base_path, tmp)
        load_tokenizer(base_path).save_pretrained(tmp)

    meta: dict = {}  # made once the norms are known, inside fill, before write_folder writes potluck.json
    write_folder(out, meta, fill, overwrite=overwrite)
    seconds = time.perf_counter() - start
    logger.info("fused %d models with %s into %s (%d tensors, %.1f s)", len(inputs), settings.method, out,
                len(specs), seconds)
    return FusionResult(Path(out), settings.method, len(inputs), len(specs), [len(m.heads) for m in inputs],
                        norms, seconds, meta)


def fuse_one(name: str, base_tensor: torch.Tensor, inputs: Sequence[WeightFile], settings: FusionSettings,
             weights: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """One body tensor of all inputs fused (float32), and each input's squared distance to the base."""
    n, base32 = len(inputs), base_tensor.float()
    sq_dist = np.zeros(n)

    def load(i: int) -> torch.Tensor:
        x = inputs[i].load(name)
        sq_dist[i] += squared_norm(x.float() - base32)
        return x

    if settings.method == "mean":
        return weighted_mean(load, weights), sq_dist
    if settings.method == "ties":
        def observe(i, tau):
            sq_dist[i] += squared_norm(tau)
        return ties_merge(lambda i: inputs[i].load(name), n, base_tensor, density=settings.density,
                          scale=settings.scale, on_task_vector=observe), sq_dist
    k = trim_count(n, settings.trim)
    out = torch.empty(base_tensor.shape, dtype=torch.float32)
    for rows in row_blocks(list(base_tensor.shape), n, settings.working_mib << 20):
        block = torch.stack([m.load(name, rows).float() for m in inputs])  # (N, rows, ...)
        own = base32 if rows is None else base32[rows]
        sq_dist += torch.linalg.vector_norm((block - own).reshape(n, -1), dim=1).double().numpy() ** 2
        fused = median(block) if settings.method == "median" else trimmed_mean(block, k)
        if rows is None:
            out = fused
        else:
            out[rows] = fused
    return out, sq_dist


def squared_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.float())) ** 2  # float32, without a float64 copy


def recorded_base(folders: Sequence[Path]) -> str:
    """The base every model records in its potluck.json; UserError when one lacks it or they differ."""
    names, resolved = [], []
    for folder in folders:
        name = read_meta(folder).get("base")
        if not isinstance(name, str):
            raise UserError(f"{folder}/potluck.json does not record the base it was fine-tuned from",
                            hint="pass --base with that base ('minilm' or a folder)")
        try:
            resolved.append(resolve_base(name))
        except UserError as err:
            raise UserError(f"{folder}/potluck.json records base '{name}', which is not found here",
                            hint="pass --base with that base ('minilm' or a folder)") from err
        names.append(name)
    for folder, name, path in zip(folders, names, resolved, strict=True):
        if path != resolved[0]:
            raise UserError(f"{folders[0]} was fine-tuned from '{names[0]}' but {folder} from '{name}'",
                            hint="fuse only models fine-tuned from one base, or pass --base")
    return names[0]


def model_weights(folders: Sequence[Path], settings: FusionSettings,
                  weights: Sequence[float] | None) -> list[float]:
    """Each model's weight in the mean: explicit numbers, example counts, or all equal."""
    if weights is not None:
        if settings.method != "mean" and len(set(weights)) > 1:
            raise UserError(f"unequal weights apply to the mean only, not {settings.method}")
        if len(weights) != len(folders) or not all(math.isfinite(x) and x > 0 for x in weights):
            raise UserError(f"weights must be {len(folders)} positive numbers, got {list(weights)}")
        return [float(x) for x in weights]
    if settings.weights == "equal":
        return [1.0] * len(folders)
    counts = []
    for folder in folders:
        n = read_meta(folder).get("data", {}).get("n_train")
        if not isinstance(n, int) or n <= 0:
            raise UserError(f"{folder}/potluck.json has no training-example count (data.n_train)",
                            hint="use --weights equal")
        counts.append(float(n))
    return counts


def fusion_metadata(base_name: str, base: WeightFile, inputs: Sequence[WeightFile], settings: FusionSettings,
                    weights: Sequence[float], norms: Sequence[float], command: str | None) -> dict:
    """potluck.json of a fused encoder: method, parameters, inputs with their hashes, and the parent base."""
    total = sum(weights)
    params = {"weights": settings.weights} if settings.method == "mean" else {}
    if settings.method == "trimmed-mean":
        params = {"trim": settings.trim, "k_per_side": trim_count(len(inputs), settings.trim)}
    elif settings.method == "ties":
        params = {"density": settings.density, "scale": settings.scale, "trim_scope": "per tensor"}
    return new_meta("potluck.encoder/1", kind="fused", method=settings.method, parameters=params,
                    parent={"base": base_name, "path": str(base.folder.resolve()), "sha256": base.sha256()},
                    inputs=[input_record(m, w / total, norm) for m, w, norm in zip(inputs, weights, norms, strict=True)],
                    command=command)


def input_record(model: WeightFile, weight: float, norm: float) -> dict:
    meta = read_meta(model.folder)
    return {"path": str(model.folder.resolve()), "sha256": model.sha256(), "weight": weight,
            "name": meta.get("name"), "n_train": meta.get("data", {}).get("n_train"),
            "heads_left_out": sorted(model.heads), "task_vector_norm": norm}


def write_encoder_config(base: Path, folder: Path) -> None:
    """The base's config.json, naming the bare encoder class (the fused folder has no head)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = load_config(base)
    bare = MODEL_MAPPING.get(type(config), None)
    if bare is not None:
        config.architectures = [bare.__name__]
    config.save_pretrained(folder)
