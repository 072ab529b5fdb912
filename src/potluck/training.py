"""What the two training loops share (finetune.py and pretrain.py): the device, AdamW with its
parameter groups, the warm-up/decay schedule, and checkpoints that a kill cannot half-write.

    device = resolve_device("auto")
    optimizer = make_optimizer(model, learning_rate=2e-4, weight_decay=0.01, head_learning_rate=2e-3)
    factor = warmup_decay(step, warmup=10, total=100)          # the learning-rate multiplier at `step`
    checkpoints = CheckpointFolder("out.checkpoints", "epoch", identity={...})
    checkpoints.write(3, {"model.safetensors": model.state_dict()}, state)

The precision each loop trains in comes from `potluck.hardware.plan_precision`; the batches from
`potluck.batching`. Training never imports the predictor or the server.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from potluck.errors import UserError
from potluck.fileio import atomic_write_json

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (a GPU where there is one) as a torch device; a UserError for a missing GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                   head_learning_rate: float = 0.0) -> torch.optim.Optimizer:
    """Fused AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights; the
    task head in groups of its own at `head_learning_rate` (0: the same as `learning_rate`)."""
    head_lr = head_learning_rate or learning_rate
    head = {id(p) for p in task_head(model).parameters()} if head_lr != learning_rate else set()
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (id(param) in head, param.ndim < 2)  # (in the head, a bias or LayerNorm weight)
            groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
          "lr": head_lr if in_head else learning_rate}
         for (in_head, no_decay), params in sorted(groups.items())],
        lr=learning_rate, fused=True)


def task_head(model: torch.nn.Module) -> torch.nn.Module:
    """The task head of a transformers sequence-classification model (`classifier`, or `score`)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    return torch.nn.Identity()


def warmup_decay(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step` (0-based): linear warm-up to 1 over `warmup` steps, then linear
    decay to 0 at `total` (transformers' default schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_decay` as a torch scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_decay(step, warmup, total))


# -- checkpoints ----------------------------------------------------------------------------------

class CheckpointFolder:
    """The latest checkpoint in `folder/<prefix>-NNNN` (`digits` wide): safetensors files and a state.json (the run's
    `identity` plus its state). Each is written under a temporary name and renamed when complete, so a
    kill at any moment leaves the previous one intact; older ones are removed after the rename."""

    def __init__(self, folder: str | Path, prefix: str, identity: Mapping, digits: int = 7):
        self.folder, self.prefix, self.digits = Path(folder), prefix, digits
        self.identity = json.loads(json.dumps(dict(identity)))  # JSON-plain, as it will be read back

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob(f"{self.prefix}-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def write(self, number: int, files: Mapping[str, Mapping | Callable[[Path], None]], state: Mapping,
              keep: tuple[str, ...] = ()) -> Path:
        """Checkpoint `number`: each file a dict of tensors (saved as safetensors) or a function that
        writes the path it is given; `keep` files are carried over from the previous checkpoint."""
        final = self.folder / f"{self.prefix}-{number:0{self.digits}d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, tmp / name)
        previous = self.latest()
        for name in keep:
            if previous is not None and (previous / name).exists() and name not in files:
                shutil.copy2(previous / name, tmp / name)
        atomic_write_json(tmp / "state.json", {**self.identity, **state})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.folder.glob(f"{self.prefix}-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
        return final

    def read(self, what: Mapping[str, str], hint: str) -> tuple[Path, dict] | tuple[None, None]:
        """The latest checkpoint and its state, refused (UserError) when its identity differs: `what`
        maps identity keys to how they are named ('corpus': 'another corpus'); 'settings' is compared
        key by key."""
        latest = self.latest()
        if latest is None:
            logger.info("no checkpoint in %s: starting from the beginning", self.folder)
            return None, None
        saved = json.loads((latest / "state.json").read_text())
        for key, name in what.items():
            if saved.get(key) != self.identity.get(key):
                raise UserError(f"the checkpoint in {self.folder} was made with {name}", hint=hint)
        check_same_settings(saved.get("settings", {}), self.identity.get("settings", {}), self.folder, hint=hint)
        return latest, saved


def check_same_settings(saved: dict, current: dict, folder, *, hint: str) -> None:
    """A checkpoint resumes only under the settings it was made with; name the ones that differ."""
    if saved != current:
        changed = sorted(k for k, v in current.items() if saved.get(k) != v)
        raise UserError(f"the checkpoint in {folder} was made with other settings ({', '.join(changed)})", hint=hint)


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """AdamW state as flat safetensors (no pickles): '{param index}.{name}' -> tensor, and the names."""
    tensors, meta = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
        meta[str(index)] = sorted(state)
    return tensors, meta


def load_optimizer(optimizer, path: Path, meta: dict) -> None:
    """Put back the AdamW state `optimizer_tensors` wrote to `path`."""
    tensors = load_file(path)
    full = optimizer.state_dict()
    full["state"] = {int(i): {name: tensors[f"{i}.{name}"] for name in names} for i, names in meta.items()}
    optimizer.load_state_dict(full)
