"""The fine-tuning loop: AdamW with warm-up and linear decay, length-grouped batches, bf16 autocast,
early stopping on validation loss, a checkpoint each epoch, and resume.

    potluck finetune --data emails.csv --text-column body --label-column urgency --out models/urgency

`TextClassifier.fit` calls `run` here; this module knows nothing about files of labelled data or
calibration. A plain loop rather than transformers' Trainer: on a CPU it is the same arithmetic with
less overhead, and we need exact control of batching, checkpoints and the order of a resumed epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from potluck import distributed
from potluck.batching import batched_logits, pad, training_batches
from potluck.errors import require
from potluck.hardware import plan_precision
from potluck.training import (
    CheckpointFolder,
    linear_schedule,
    load_optimizer,
    make_optimizer,
    optimizer_tensors,
    resolve_device,
)

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
        require(
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
        )


@dataclass
class FinetuneResult:
    history: list[dict]             # one row per step: step, epoch, loss, lr; and per epoch: valid_loss
    best_epoch: int
    best_valid_loss: float
    epochs_run: int
    examples_per_s: float
    bf16: bool
    world_size: int = 1             # processes that trained; the effective batch is settings.batch_size
    valid_logits: np.ndarray | None = field(default=None, repr=False)  # the best epoch's, None after a resume


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


def class_weight_tensor(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode != "balanced":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


@dataclass
class _Run:
    """What one fine-tuning run holds between its steps (built by `_build`)."""

    model: torch.nn.Module
    forward: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    ctx: distributed.Context
    device: torch.device
    bf16: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoints: Checkpoints | None
    state: dict  # epoch, step, best_epoch, best_valid_loss, bad_epochs, history
    best: dict | None  # the best epoch's weights (None until known after a resume)
    class_weights: torch.Tensor | None
    label_weight: np.ndarray  # per class, for the loss denominators
    total_steps: int
    frozen: list = field(default_factory=list)
    attention: str = "sdpa"
    best_logits: np.ndarray | None = None  # the validation logits of the best epoch
    seen: int = 0
    seconds: float = 0.0


def run(model, train_ids: list[list[int]], train_labels: np.ndarray, valid_ids: list[list[int]],
        valid_labels: np.ndarray, settings: FinetuneSettings, *, pad_id: int,
        checkpoint_dir: str | Path | None = None, resume: bool = False, fingerprint: str = "",
        on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune `model` in place and leave the weights of the best validation epoch in it.

    build -> per epoch: the training steps, then the end of the epoch (validation loss, best weights,
    checkpoint) -> the stop check (patience). Under torchrun every rank runs this same function.
    """
    r = _build(model, train_labels, settings, checkpoint_dir, resume, fingerprint, len(train_ids))
    on_step = on_step if r.ctx.is_main else None
    for epoch in range(r.state["epoch"], settings.epochs):
        if r.state["bad_epochs"] > settings.patience:
            break
        _train_epoch(r, epoch, train_ids, train_labels, settings, pad_id, on_step)
        _end_of_epoch(r, epoch, valid_ids, valid_labels, pad_id, on_step)
        if r.state["bad_epochs"] >= settings.patience:
            logger.info("early stopping: no better validation loss for %d epochs", settings.patience)
            break
    return _finish(r)


def _build(model, train_labels: np.ndarray, settings: FinetuneSettings, checkpoint_dir, resume: bool,
           fingerprint: str, n_train: int) -> _Run:
    """Device, precision, optimiser, schedule, class weights, checkpoints; the state to start from."""
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
    n_classes = model.config.num_labels
    weights = class_weight_tensor(train_labels, n_classes, settings.class_weights)
    total_steps = math.ceil(n_train / settings.batch_size) * settings.epochs
    optimizer = make_optimizer(model, learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
                               head_learning_rate=settings.head_learning_rate)
    scheduler = linear_schedule(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    checkpoints = Checkpoints(checkpoint_dir, settings, fingerprint, ctx) if checkpoint_dir else None
    state = {"epoch": 0, "step": 0, "best_epoch": 0, "best_valid_loss": math.inf, "bad_epochs": 0, "history": []}
    if checkpoints and resume:
        state = checkpoints.restore(model, optimizer, scheduler) or state
    best = {k: v.detach().clone() for k, v in model.state_dict().items()} if state["epoch"] == 0 else None
    if checkpoints and state["epoch"] > 0:
        best = checkpoints.load_best(device)
    return _Run(model=model, forward=torch.nn.parallel.DistributedDataParallel(model) if ctx.enabled else model,
                ctx=ctx, device=device, bf16=bf16, optimizer=optimizer, scheduler=scheduler, checkpoints=checkpoints,
                state=state, best=best, class_weights=weights.to(device) if weights is not None else None,
                label_weight=weights.numpy() if weights is not None else np.ones(n_classes),
                total_steps=total_steps, frozen=frozen, attention=attention)


def _train_epoch(r: _Run, epoch: int, train_ids, train_labels: np.ndarray, settings: FinetuneSettings,
                 pad_id: int, on_step) -> None:
    """The training steps of one epoch, each on this rank's slice of the same global batch."""
    torch.manual_seed(settings.seed * 1000 + epoch + 7919 * r.ctx.rank)  # dropout: the same after a resume
    r.model.train()
    lengths = [len(row) for row in train_ids]
    for batch in training_batches(lengths, settings.batch_size, seed=settings.seed, epoch=epoch):
        start = time.perf_counter()
        loss = _step(r, batch, train_ids, train_labels, settings, pad_id)
        r.state["step"] += 1
        r.seconds += time.perf_counter() - start
        r.seen += len(batch)
        row = {"step": r.state["step"], "epoch": epoch + 1, "loss": loss / r.ctx.world_size,
               "lr": r.scheduler.get_last_lr()[0]}
        r.state["history"].append(row)
        if on_step:
            on_step({**row, "total_steps": r.total_steps, "examples_per_s": r.seen / max(r.seconds, 1e-9)})


def _step(r: _Run, batch: list[int], train_ids, train_labels: np.ndarray, settings: FinetuneSettings,
          pad_id: int) -> float:
    """One optimiser step on a global batch; returns this rank's share of the loss."""
    local = distributed.shard(batch, r.ctx)
    share = 1.0 if local else 0.0  # a rank left without examples still joins the all-reduce
    local = local or batch[:1]
    input_ids, mask = pad([train_ids[i] for i in local], pad_id)  # (b, T), (b, T)
    targets = torch.as_tensor(train_labels[local], device=r.device)  # (b,)
    with torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=r.bf16):
        logits = r.forward(input_ids=input_ids.to(r.device), attention_mask=mask.to(r.device)).logits  # (b, C)
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, weight=r.class_weights, reduction="none")
    # The mean over the *global* batch (weighted like cross_entropy's weight=): DDP averages the
    # gradients over ranks, so each rank scales its sum by world_size / global denominator.
    denominator = float(r.label_weight[train_labels[batch]].sum())
    loss = losses.sum() * share * r.ctx.world_size / denominator
    loss.backward()
    torch.nn.utils.clip_grad_norm_(r.model.parameters(), settings.max_grad_norm)
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _end_of_epoch(r: _Run, epoch: int, valid_ids, valid_labels: np.ndarray, pad_id: int, on_step) -> None:
    """Validation loss; the best weights (and their validation logits) when it improved; a checkpoint."""
    logits = batched_logits(r.model, valid_ids, pad_id=pad_id, bf16=r.bf16, device=r.device)
    valid_loss = float(torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(valid_labels)))
    r.state["history"].append({"step": r.state["step"], "epoch": epoch + 1, "valid_loss": valid_loss})
    logger.info("epoch %d: validation loss %.4f", epoch + 1, valid_loss)
    improved = valid_loss < r.state["best_valid_loss"] - 1e-4
    if improved:
        r.state.update(best_epoch=epoch + 1, best_valid_loss=valid_loss, bad_epochs=0)
        r.best = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        r.best_logits = logits
    else:
        r.state["bad_epochs"] += 1
    r.state["epoch"] = epoch + 1
    if on_step:
        on_step({"epoch_end": epoch + 1, "valid_loss": valid_loss, "improved": improved})
    if r.checkpoints:
        r.checkpoints.save(r.model, r.optimizer, r.scheduler, r.state, r.best if improved else None)


def _finish(r: _Run) -> FinetuneResult:
    """The best epoch's weights back in the model, which leaves in eval mode as it came in otherwise."""
    r.model.load_state_dict(r.best)
    r.model.set_attn_implementation(r.attention)
    for param in r.frozen:
        param.requires_grad_(True)
    r.model.eval()
    return FinetuneResult(history=r.state["history"], best_epoch=r.state["best_epoch"],
                          best_valid_loss=r.state["best_valid_loss"], epochs_run=r.state["epoch"],
                          examples_per_s=r.seen / r.seconds if r.seconds else 0.0, bf16=r.bf16,
                          world_size=r.ctx.world_size, valid_logits=r.best_logits)


class Checkpoints:
    """One checkpoint per finished epoch (potluck.training.CheckpointFolder): model, optimiser and best
    weights in safetensors, the rest in JSON. Resume refuses a checkpoint made with other data or other
    settings."""

    def __init__(self, folder: str | Path, settings: FinetuneSettings, fingerprint: str,
                 ctx: distributed.Context | None = None):
        self.ctx = ctx or distributed.Context()
        self.folder = CheckpointFolder(folder, "epoch", {"fingerprint": fingerprint, "settings": asdict(settings)},
                                       digits=4)

    def save(self, model, optimizer, scheduler, state: dict, best: dict | None) -> None:
        """Rank 0 writes; every rank waits until it has, so a resume finds the same checkpoint."""
        if self.ctx.is_main:
            tensors, meta = optimizer_tensors(optimizer)
            files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": tensors}
            if best is not None:
                files["best.safetensors"] = best
            self.folder.write(state["epoch"], files, {**state, "optimizer": meta, "scheduler": scheduler.state_dict()},
                              keep=("best.safetensors",))
        self.ctx.barrier()

    def restore(self, model, optimizer, scheduler) -> dict | None:
        latest, saved = self.folder.read({"fingerprint": "other data"},
                                         hint="resume with the same data and options, or drop --resume to start afresh")
        if latest is None:
            return None
        model.load_state_dict(load_file(latest / "model.safetensors"))
        load_optimizer(optimizer, latest / "optimizer.safetensors", saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        logger.info("resumed from %s (epoch %d, step %d)", latest, saved["epoch"], saved["step"])
        return {k: saved[k] for k in ("epoch", "step", "best_epoch", "best_valid_loss", "bad_epochs", "history")}

    def load_best(self, device) -> dict:
        return {k: v.to(device) for k, v in load_file(self.folder.latest() / "best.safetensors").items()}
