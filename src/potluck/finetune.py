"""The fine-tuning loop: AdamW with warm-up and linear decay, length-grouped batches, bf16 autocast,
early stopping on validation loss, a checkpoint each epoch, and resume.

    potluck finetune --data emails.csv --text-column body --label-column urgency --out models/urgency

`TextClassifier.fit` calls `run` here; this module knows nothing about files of labelled data or
calibration. A plain loop rather than transformers' Trainer: on a CPU it is the same arithmetic with
less overhead, and we need exact control of batching, checkpoints and the order of a resumed epoch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from potluck import distributed
from potluck.batching import pad, training_batches
from potluck.errors import UserError
from potluck.fileio import atomic_write_json
from potluck.hardware import plan_precision
from potluck.inference import batched_logits

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """How to fine-tune. The model's shape lives in its config.json, never here."""

    epochs: int = field(default=4, metadata={"help": "passes over the training data (early stopping may end sooner)"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimiser step"})
    learning_rate: float = field(default=2e-4, metadata={
        "help": "peak learning rate of AdamW for the encoder (the default suits small encoders such as MiniLM; "
                "use 2e-5 to 5e-5 for base-size ones)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and LayerNorm)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warm-up"})
    max_length: int = field(default=128, metadata={"help": "tokens per text; longer texts are truncated"})
    patience: int = field(default=2, metadata={"help": "epochs without a better validation loss before stopping"})
    valid_fraction: float = field(default=0.1, metadata={"help": "stratified share held back when no validation file is given"})
    class_weights: str = field(default="none", metadata={"help": "'none' or 'balanced' (loss weights n / (k * count))"})
    precision: str = field(default="auto", metadata={"help": "'auto' (bf16 where the hardware has it), 'fp32' or 'bf16'"})
    calibrate: bool = field(default=True, metadata={"help": "fit a temperature on the validation split"})
    seed: int = field(default=0, metadata={"help": "one seed for the head, the split, the order and dropout"})
    device: str = field(default="cpu", metadata={"help": "'cpu', 'cuda', or 'auto'"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    head_learning_rate: float = field(default=2e-3, metadata={
        "help": "peak learning rate of the new classification head, which starts from nothing (0: the same as "
                "--learning-rate)"})
    train_word_embeddings: bool = field(default=False, metadata={
        "help": "also update the word-embedding matrix (kept fixed by default: on MiniLM it is half the weights "
                "and most of the optimiser's work, see benchmarks/finetune.py)"})

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.head_learning_rate >= 0, "head_learning_rate must not be negative (0: the same as learning_rate)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (8 <= self.max_length <= 8192, "max_length must be between 8 and 8192"),
            (0 < self.valid_fraction < 0.5, "valid_fraction must be in (0, 0.5)"),
            (self.class_weights in ("none", "balanced"), "class_weights must be 'none' or 'balanced'"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be 'auto', 'fp32' or 'bf16'"),
            (self.device in ("cpu", "cuda", "auto"), "device must be 'cpu', 'cuda' or 'auto'"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class FinetuneResult:
    history: list[dict]             # one row per step: step, epoch, loss, lr; and per epoch: valid_loss
    best_epoch: int
    best_valid_loss: float
    epochs_run: int
    examples_per_s: float
    bf16: bool
    world_size: int = 1             # processes that trained; the effective batch is settings.batch_size


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights; the head (if `settings` gives it a
    learning rate of its own) in groups of its own."""
    head_lr = getattr(settings, "head_learning_rate", 0.0) or settings.learning_rate
    head = {id(p) for p in _head(model).parameters()} if head_lr != settings.learning_rate else set()
    groups = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (id(param) in head, param.ndim < 2)  # (in the head, a bias or LayerNorm weight)
            groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else settings.weight_decay,
          "lr": head_lr if in_head else settings.learning_rate}
         for (in_head, no_decay), params in sorted(groups.items())],
        lr=settings.learning_rate, fused=True)


def _head(model: torch.nn.Module) -> torch.nn.Module:
    """The task head of a transformers sequence-classification model (`classifier`, or `score`)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    return torch.nn.Identity()


def freeze_word_embeddings(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Stop gradients to the input word embeddings; return what was frozen.

    A few thousand labelled texts touch a small part of a 30k-word vocabulary, and updating the whole
    matrix costs a dense gradient and an AdamW update over it at every step.
    """
    weight = model.get_input_embeddings().weight
    if not weight.requires_grad:
        return []
    weight.requires_grad_(False)
    return [weight]


def linear_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then linear decay to zero (transformers' default schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weight_tensor(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode != "balanced":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def run(model, train_ids: list[list[int]], train_labels: np.ndarray, valid_ids: list[list[int]],
        valid_labels: np.ndarray, settings: FinetuneSettings, *, pad_id: int,
        checkpoint_dir: str | Path | None = None, resume: bool = False, fingerprint: str = "",
        on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune `model` in place and leave the weights of the best validation epoch in it.

    Under torchrun every rank runs this same function; see distributed.py.
    """
    ctx = distributed.context()
    device = distributed.device_for(ctx, resolve_device(settings.device))
    distributed.init(ctx, device)
    model.to(device)
    frozen = freeze_word_embeddings(model) if not settings.train_word_embeddings else []
    bf16 = plan_precision(settings.precision, device, purpose="training").bf16
    attention = model.config._attn_implementation
    if bf16 and device.type == "cpu" and attention == "sdpa":
        # torch's CPU flash-attention backward in bf16 is slow at these lengths (about a third of the step
        # in a profile of MiniLM on 25-token texts); the plain matmul attention is faster to train.
        model.set_attn_implementation("eager")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ctx.enabled else model
    on_step = on_step if ctx.is_main else None
    n_classes = model.config.num_labels
    weights = class_weight_tensor(train_labels, n_classes, settings.class_weights)
    label_weight = weights.numpy() if weights is not None else np.ones(n_classes)  # for the denominators
    weights = weights.to(device) if weights is not None else None
    lengths = [len(row) for row in train_ids]
    steps_per_epoch = math.ceil(len(train_ids) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = make_optimizer(model, settings)
    scheduler = linear_schedule(optimizer, int(settings.warmup_ratio * total_steps), total_steps)

    ckpt = Checkpoints(checkpoint_dir, settings, fingerprint, ctx) if checkpoint_dir else None
    state = {"epoch": 0, "step": 0, "best_epoch": 0, "best_valid_loss": math.inf, "bad_epochs": 0, "history": []}
    if ckpt and resume:
        state = ckpt.restore(model, optimizer, scheduler) or state
    history = state["history"]
    seen, seconds = 0, 0.0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if state["epoch"] == 0 else None
    if ckpt and state["epoch"] > 0:
        best_state = ckpt.load_best(device)

    for epoch in range(state["epoch"], settings.epochs):
        if state["bad_epochs"] > settings.patience:
            break
        torch.manual_seed(settings.seed * 1000 + epoch + 7919 * ctx.rank)  # dropout: the same after a resume
        model.train()
        for batch in training_batches(lengths, settings.batch_size, seed=settings.seed, epoch=epoch):
            start = time.perf_counter()
            local = distributed.shard(batch, ctx)
            share = 1.0 if local else 0.0  # a rank left without examples still joins the all-reduce
            local = local or batch[:1]
            input_ids, mask = pad([train_ids[i] for i in local], pad_id)  # (b, T), (b, T)
            targets = torch.as_tensor(train_labels[local], device=device)  # (b,)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = train_model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (b, C)
            losses = torch.nn.functional.cross_entropy(logits.float(), targets, weight=weights, reduction="none")
            # The mean over the *global* batch (weighted like cross_entropy's weight=): DDP averages the
            # gradients over ranks, so each rank scales its sum by world_size / global denominator.
            denominator = float(label_weight[train_labels[batch]].sum())
            loss = losses.sum() * share * ctx.world_size / denominator
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            seconds += time.perf_counter() - start
            seen += len(batch)
            row = {"step": state["step"], "epoch": epoch + 1, "loss": loss.item() / ctx.world_size,
                   "lr": scheduler.get_last_lr()[0]}
            history.append(row)
            if on_step:
                on_step({**row, "total_steps": total_steps, "examples_per_s": seen / max(seconds, 1e-9)})

        valid_logits = batched_logits(model, valid_ids, pad_id=pad_id, bf16=bf16, device=device)
        valid_loss = float(torch.nn.functional.cross_entropy(torch.as_tensor(valid_logits),
                                                             torch.as_tensor(valid_labels)))
        history.append({"step": state["step"], "epoch": epoch + 1, "valid_loss": valid_loss})
        logger.info("epoch %d: validation loss %.4f", epoch + 1, valid_loss)
        improved = valid_loss < state["best_valid_loss"] - 1e-4
        if improved:
            state.update(best_epoch=epoch + 1, best_valid_loss=valid_loss, bad_epochs=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if on_step:
            on_step({"epoch_end": epoch + 1, "valid_loss": valid_loss, "improved": improved})
        if ckpt:
            ckpt.save(model, optimizer, scheduler, state, best_state if improved else None)
        if state["bad_epochs"] >= settings.patience:
            logger.info("early stopping: no better validation loss for %d epochs", settings.patience)
            break

    model.load_state_dict(best_state)
    model.set_attn_implementation(attention)
    for param in frozen:
        param.requires_grad_(True)
    model.eval()
    return FinetuneResult(history=history, best_epoch=state["best_epoch"],
                          best_valid_loss=state["best_valid_loss"], epochs_run=state["epoch"],
                          examples_per_s=seen / seconds if seconds else 0.0, bf16=bf16,
                          world_size=ctx.world_size)


class Checkpoints:
    """One folder per finished epoch: model, optimiser and best weights in safetensors, the rest in JSON.

    An epoch's folder is written under a temporary name and renamed when complete, so a kill at any
    moment leaves the previous epoch's checkpoint intact. Resume refuses a checkpoint made with other
    data or other settings.
    """

    def __init__(self, folder: str | Path, settings: FinetuneSettings, fingerprint: str,
                 ctx: distributed.Context | None = None):
        self.folder = Path(folder)
        self.ctx = ctx or distributed.Context()
        self.identity = {"fingerprint": fingerprint, "settings": asdict(settings)}

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("epoch-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def save(self, model, optimizer, scheduler, state: dict, best_state: dict | None) -> None:
        """Rank 0 writes; every rank waits until it has, so a resume finds the same checkpoint."""
        if self.ctx.is_main:
            self._write(model, optimizer, scheduler, state, best_state)
        self.ctx.barrier()

    def _write(self, model, optimizer, scheduler, state: dict, best_state: dict | None) -> None:
        final = self.folder / f"epoch-{state['epoch']:04d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
        previous = self.latest()
        if best_state is not None:
            save_file(_contiguous(best_state), tmp / "best.safetensors")
        elif previous is not None and (previous / "best.safetensors").exists():
            shutil.copy2(previous / "best.safetensors", tmp / "best.safetensors")
        tensors, meta = _optimizer_to_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", {**self.identity, **state, "optimizer": meta,
                                               "scheduler": scheduler.state_dict()})
        tmp.rename(final)
        for old in self.folder.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)

    def restore(self, model, optimizer, scheduler) -> dict | None:
        latest = self.latest()
        if latest is None:
            logger.info("no checkpoint in %s: starting from the beginning", self.folder)
            return None
        saved = json.loads((latest / "state.json").read_text())
        if saved["fingerprint"] != self.identity["fingerprint"]:
            raise UserError(f"the checkpoint in {self.folder} was made with other data",
                            hint="use the same data to resume, or drop --resume to start afresh")
        check_same_settings(saved["settings"], self.identity["settings"], self.folder,
                            hint="resume with the same options, or drop --resume to start afresh")
        model.load_state_dict(load_file(latest / "model.safetensors"))
        _optimizer_from_tensors(optimizer, load_file(latest / "optimizer.safetensors"), saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        logger.info("resumed from %s (epoch %d, step %d)", latest, saved["epoch"], saved["step"])
        return {k: saved[k] for k in ("epoch", "step", "best_epoch", "best_valid_loss", "bad_epochs", "history")}

    def load_best(self, device) -> dict:
        latest = self.latest()
        return {k: v.to(device) for k, v in load_file(latest / "best.safetensors").items()}


def check_same_settings(saved: dict, current: dict, folder, *, hint: str) -> None:
    """A checkpoint resumes only under the settings it was made with; name the ones that differ."""
    if saved != current:
        changed = sorted(k for k, v in current.items() if saved.get(k) != v)
        raise UserError(f"the checkpoint in {folder} was made with other settings ({', '.join(changed)})", hint=hint)


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _optimizer_to_tensors(optimizer) -> tuple[dict, dict]:
    """AdamW state as flat safetensors (no pickles): '{param index}.{name}' -> tensor."""
    tensors, meta = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
        meta[str(index)] = sorted(state)
    return tensors, meta


def _optimizer_from_tensors(optimizer, tensors: dict, meta: dict) -> None:
    full = optimizer.state_dict()
    full["state"] = {int(i): {name: tensors[f"{i}.{name}"] for name in names} for i, names in meta.items()}
    optimizer.load_state_dict(full)
