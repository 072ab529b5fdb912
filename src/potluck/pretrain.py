"""Masked-LM pre-training, from scratch or continued from an encoder, and fill-mask.

    potluck tokenizer --corpus texts/ --vocab-size 16000 --out tok/
    potluck pretrain --corpus texts/ --size mini --tokenizer tok/ --out enc/      # from scratch
    potluck pretrain --corpus emails.txt --from minilm --out enc-adapted/        # continued
    potluck fill enc/ "The payment was [MASK] twice."

The model is transformers' `BertForMaskedLM`; the loop is ours (as in finetune.py): documents are
packed into full blocks (no padding), 15 % of tokens (or whole words) are masked 80/10/10, the MLM
head runs only on the masked positions, bf16 autocast where the CPU has it, AdamW with warm-up and
linear decay (re-planned to end on time under --max-time), gradient accumulation, a held-out slice of
the corpus for loss / perplexity / accuracy, and safetensors checkpoints that `resume` continues
exactly. The output is a Hugging Face folder that `pipeline("fill-mask")` and `potluck finetune
--base` both load. Masking and the output folder live in `potluck.mlm`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from potluck import distributed
from potluck.errors import UserError, require
from potluck.fileio import check_output
from potluck.folder import load_pretrained
from potluck.hardware import plan_precision
from potluck.mlm import Masker, PretrainCheckpoints, held_out_metrics, wrap_for_ddp
from potluck.training import make_optimizer, resolve_device, warmup_decay

logger = logging.getLogger(__name__)

# Google's BERT miniatures (Turc et al. 2019): layers x hidden, 64-wide heads, feed-forward 4 x hidden.
SIZES = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
    "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
}
AUTO_LR = {"scratch": 5e-4, "continued": 5e-5}
NEW_HEAD = "the base had no masked-LM head: a new one was initialised, its decoder tied to the input embeddings"
BUDGET_FIELDS = ("epochs", "max_steps", "max_time", "eval_every", "checkpoint_every")  # may change on resume


@dataclass
class PretrainSettings:
    """How to pre-train. A from-scratch model's shape comes from `size`; a continued one keeps its own."""

    size: str = field(default="mini", metadata={"help": "from scratch: tiny (2 layers x 128), mini (4 x 256) or small (4 x 512); ignored with --from"})
    block_size: int = field(default=128, metadata={"help": "tokens per packed training block"})
    batch_size: int = field(default=32, metadata={"help": "blocks per forward pass"})
    grad_accumulation: int = field(default=1, metadata={"help": "forward passes per optimiser step"})
    epochs: int = field(default=3, metadata={"help": "passes over the corpus (--max-steps / --max-time may end sooner)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimiser steps (0: no limit)"})
    max_time: float = field(default=0.0, metadata={"help": "stop after this many seconds; the schedule decays to end on time (0: no limit)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak AdamW learning rate (0: 5e-4 from scratch, 5e-5 continued)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and LayerNorm)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps for linear warm-up"})
    new_head_steps: int = field(default=50, metadata={"help": "continuing from an encoder without an MLM head: train the new head alone (encoder frozen, 10x the peak learning rate) for this many steps first"})
    mask_probability: float = field(default=0.15, metadata={"help": "share of tokens (or words) to predict; of them 80% [MASK], 10% random, 10% kept"})
    whole_word_mask: bool = field(default=False, metadata={"help": "mask all pieces of a word together"})
    valid_fraction: float = field(default=0.05, metadata={"help": "share of documents held out for loss / perplexity / accuracy"})
    valid_blocks: int = field(default=256, metadata={"help": "at most this many held-out blocks per evaluation"})
    eval_every: int = field(default=500, metadata={"help": "evaluate on the held-out slice every N steps (and at the end)"})
    checkpoint_every: int = field(default=500, metadata={"help": "write a checkpoint every N steps (and at the end)"})
    precision: str = field(default="auto", metadata={"help": "'auto' (bf16 where the hardware has it), 'fp32' or 'bf16'"})
    seed: int = field(default=0, metadata={"help": "one seed for the model, the split, the order, the masks and dropout"})
    device: str = field(default="cpu", metadata={"help": "'cpu', 'cuda', or 'auto'"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})

    def __post_init__(self):
        require(
            (self.size in SIZES, f"size must be one of {', '.join(SIZES)}"),
            (8 <= self.block_size <= 512, "block_size must be between 8 and 512"),
            (self.batch_size >= 1 and self.grad_accumulation >= 1, "batch_size and grad_accumulation must be at least 1"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.max_steps >= 0 and self.max_time >= 0, "max_steps and max_time must not be negative"),
            (self.learning_rate >= 0, "learning_rate must not be negative (0 picks one)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 < self.mask_probability < 1, "mask_probability must be in (0, 1)"),
            (0 < self.valid_fraction < 0.5, "valid_fraction must be in (0, 0.5)"),
            (self.valid_blocks >= 1, "valid_blocks must be at least 1"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must not be negative"),
            (self.new_head_steps >= 0, "new_head_steps must not be negative"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be 'auto', 'fp32' or 'bf16'"),
            (self.device in ("cpu", "cuda", "auto"), "device must be 'cpu', 'cuda' or 'auto'"),
        )

    def peak_lr(self, continued: bool) -> float:
        return self.learning_rate or AUTO_LR["continued" if continued else "scratch"]


@dataclass
class PretrainResult:
    steps: int                      # optimiser steps done in all (a resumed run counts the earlier ones)
    tokens: int                     # training tokens seen in all
    seconds: float                  # wall time of the loop in all, evaluations included
    tokens_per_s: float             # training throughput of this run (evaluations and checkpoints excluded)
    stopped_by: str                 # 'epochs', 'max_steps' or 'max_time'
    bf16: bool
    evals: list[dict]               # held-out metrics: step, loss, perplexity, accuracy, masked_tokens
    history: list[dict] = field(repr=False)  # one row per step: step, epoch, loss, lr
    head_only_steps: int = 0        # of `steps`, those that trained a new MLM head alone (encoder frozen)

    @property
    def encoder_steps(self) -> int:
        """Steps that updated the encoder itself."""
        return self.steps - self.head_only_steps


def build_model(tokenizer, settings: PretrainSettings, base: str | None = None):
    """(BertForMaskedLM, note, kept): a fresh `size` model, or `base` with its MLM head (a new one if it has
    none). `kept` holds the base's pooler weights, which BertForMaskedLM has no place for: the output folder
    carries them on, so fine-tuning starts from the same pooler as the base would."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(settings.seed)
    if base is None:
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                            pad_token_id=tokenizer.pad_token_id, **SIZES[settings.size])
        return BertForMaskedLM(config), f"new {settings.size} model", {}
    from potluck.encoders import load_config, resolve_base

    config = load_config(base)
    if config.model_type != "bert":
        raise UserError(f"base '{base}' is a {config.model_type} model; continued pre-training supports "
                        "BERT encoders", hint="use 'minilm' or another BERT-family folder")
    if settings.block_size > config.max_position_embeddings:
        raise UserError(f"block size {settings.block_size} is longer than base '{base}' allows "
                        f"({config.max_position_embeddings})", hint="lower --block-size")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but base '{base}' only {config.vocab_size}",
                        hint="continue with the base's own tokenizer (drop --tokenizer)")
    model, info = load_pretrained(BertForMaskedLM, resolve_base(base), name=f"base '{base}'", may_lack=("cls.",),
                                  may_add=("pooler.", "classifier."))
    new_head = sorted(k for k in info["missing_keys"] if k.startswith("cls."))
    note = "continued from its own masked-LM head"
    if new_head:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        note = NEW_HEAD
        logger.warning("%s: %s", base, note)
    return model, note, _pooler_of(resolve_base(base), info["unexpected_keys"])


def _pooler_of(source: str, unexpected: set[str]) -> dict[str, torch.Tensor]:
    """The base's pooler tensors, named as in a BertForMaskedLM file ('bert.pooler...'), read with safetensors."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    names = [k for k in unexpected if k.startswith(("pooler.", "bert.pooler."))]
    if not names:
        return {}
    try:
        path = cached_file(source, "model.safetensors")
    except OSError:
        path = None
    if path is None:
        logger.info("the pooler of %s is not in one model.safetensors file: fine-tuning will start a new one", source)
        return {}
    with safe_open(path, framework="pt") as f:
        return {"bert." + k.removeprefix("bert."): f.get_tensor(k) for k in names if k in f.keys()}


def tokenize_corpus(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds [CLS] and [SEP])."""
    return tokenizer(documents, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]


@dataclass
class _Run:
    """What one pre-training run holds between its steps (built by `_build`)."""

    model: torch.nn.Module
    ctx: distributed.Context
    device: torch.device
    bf16: bool
    optimizer: torch.optim.Optimizer
    checkpoints: PretrainCheckpoints | None  # rank 0's; None on the other ranks
    state: dict  # step, tokens, seconds, history, evals
    plan: dict  # total steps (a time budget lowers it), warm-up steps, head-only steps
    limit: int  # the steps of the epochs or --max-steps, before any time budget
    steps_per_epoch: int
    per_step: int  # blocks per optimiser step, over all ranks
    learning_rate: float
    began: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0
    run_steps: int = 0  # steps done by this process (a resumed run counts from 0)
    orders: dict = field(default_factory=dict)  # epoch -> the order of the blocks
    forward: torch.nn.Module | None = None  # the (DDP-)wrapped model, rebuilt when the trainable set changes
    wrapped_for: bool | None = None

    def elapsed(self) -> float:
        return self.state["seconds"] + time.perf_counter() - self.began

    def tokens_per_s(self, block_size: int) -> float:
        return self.run_steps * self.per_step * block_size / self.train_seconds if self.train_seconds else 0.0


def run(model, train_blocks: np.ndarray, valid_blocks: np.ndarray, masker: Masker, settings: PretrainSettings,
        *, learning_rate: float, checkpoints: PretrainCheckpoints | None = None, resume: bool = False,
        on_step: Callable[[dict], None] | None = None, head_steps: int = 0) -> PretrainResult:
    """Pre-train `model` in place on (N, T) blocks; returns what happened, with held-out metrics.

    build -> evaluate the start -> steps until the plan runs out or the time budget is spent (each
    step: train, record, maybe re-plan, evaluate, checkpoint) -> a last evaluation and checkpoint.
    The first `head_steps` steps train only the MLM head (a new one), at 10x the peak learning rate and
    with the encoder frozen, so gradients through a random head do not disturb what the encoder knows
    (linear probing before fine-tuning, Kumar et al. 2022); warm-up and decay follow from there.
    """
    r = _build(model, len(train_blocks), settings, learning_rate, checkpoints, resume, head_steps)
    on_step = on_step if r.ctx.is_main else None
    evaluate = functools.partial(_evaluate, r, valid_blocks[:settings.valid_blocks], masker, settings, on_step)
    if not r.state["evals"]:
        evaluate()  # the starting point, so the card can say how far the loss fell
    model.train()
    stopped_by = None
    while r.state["step"] < r.plan["total"]:
        if settings.max_time and distributed.agree(r.ctx, r.elapsed() >= settings.max_time):  # rank 0's clock
            stopped_by = "max_time"
            break
        _step(r, train_blocks, masker, settings, on_step)
        if settings.eval_every and r.state["step"] % settings.eval_every == 0:
            evaluate()
            model.train()
        if r.checkpoints and settings.checkpoint_every and r.state["step"] % settings.checkpoint_every == 0:
            r.checkpoints.save(model, r.optimizer, {**r.state, "seconds": r.elapsed()})
    if stopped_by is None:  # the step plan ran out: the time budget (it set the plan), --max-steps, or the epochs
        stopped_by = ("max_time" if r.plan["total"] < r.limit else
                      "max_steps" if settings.max_steps and r.state["step"] >= settings.max_steps else "epochs")
    return _finish(r, stopped_by, evaluate, train_blocks.shape[1])


def _build(model, n_blocks: int, settings: PretrainSettings, learning_rate: float,
           checkpoints: PretrainCheckpoints | None, resume: bool, head_steps: int) -> _Run:
    """Device, precision, optimiser, the step plan; the state to start from (a checkpoint's with resume)."""
    ctx = distributed.context()
    device = distributed.device_for(ctx, resolve_device(settings.device))
    distributed.init(ctx, device)
    if settings.batch_size < ctx.world_size:
        raise UserError(f"--batch-size {settings.batch_size} is smaller than the {ctx.world_size} processes",
                        hint="each process needs at least one block per batch: raise --batch-size")
    model.to(device)
    per_step = settings.batch_size * settings.grad_accumulation  # the effective (global) batch, in blocks
    steps_per_epoch = max(1, n_blocks // per_step)
    limit = steps_per_epoch * settings.epochs
    limit = min(limit, settings.max_steps) if settings.max_steps else limit
    optimizer = make_optimizer(model, learning_rate=learning_rate, weight_decay=settings.weight_decay)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "history": [], "evals": []}
    if checkpoints and resume:
        state = checkpoints.restore(model, optimizer) or state  # every rank resumes from the same files
    return _Run(model=model, ctx=ctx, device=device, bf16=plan_precision(settings.precision, device,
                                                                        purpose="training").bf16,
                optimizer=optimizer, checkpoints=checkpoints if ctx.is_main else None, state=state,
                plan={"total": limit, "warmup": _warmup(settings, limit, head_steps), "head": head_steps},
                limit=limit, steps_per_epoch=steps_per_epoch, per_step=per_step, learning_rate=learning_rate)


def _warmup(settings: PretrainSettings, total: int, head_steps: int) -> int:
    return max(1, round(settings.warmup_ratio * max(total - head_steps, 1)))


def _step(r: _Run, blocks: np.ndarray, masker: Masker, settings: PretrainSettings, on_step) -> None:
    """One optimiser step and its record; under a time budget, the plan re-made from the speed so far."""
    started = time.perf_counter()
    step = r.state["step"]
    epoch, within = divmod(step, r.steps_per_epoch)
    encoder_trains = step >= r.plan["head"]
    r.model.bert.requires_grad_(encoder_trains)  # (B, T) blocks flow through a frozen encoder at first
    if r.forward is None or r.wrapped_for != encoder_trains:  # DDP registers trainable parameters when built
        r.forward, r.wrapped_for = wrap_for_ddp(r.model, r.ctx), encoder_trains
    if epoch not in r.orders:
        r.orders = {epoch: np.random.default_rng([settings.seed, epoch]).permutation(len(blocks))}
    loss, lr = _train_step(r.forward, r.model, r.optimizer, blocks, r.orders[epoch], step, within, masker,
                           settings, r.learning_rate * _lr_factor(step, r.plan), r.device, r.bf16, r.ctx)
    if not math.isfinite(loss):
        raise UserError(f"the training loss became {loss} at step {step + 1}: training diverged",
                        hint="lower --learning-rate or raise --warmup-ratio (the last checkpoint is intact)")
    r.state["step"] += 1
    r.state["tokens"] += r.per_step * blocks.shape[1]
    r.train_seconds += time.perf_counter() - started
    r.run_steps += 1
    row = {"step": r.state["step"], "epoch": epoch + 1, "loss": loss, "lr": lr}
    r.state["history"].append(row)
    if settings.max_time and r.run_steps >= 3 and r.run_steps % 5 == 0:
        left = settings.max_time - r.elapsed()
        total = min(r.limit, r.state["step"] + max(1, int(left / (r.train_seconds / r.run_steps))))
        r.plan["total"] = int(distributed.agree(r.ctx, total))  # every rank plans rank 0's number of steps
        r.plan["warmup"] = _warmup(settings, r.plan["total"], r.plan["head"])
    if on_step:
        on_step({**row, "total_steps": r.plan["total"], "elapsed": r.elapsed(),
                 "tokens_per_s": r.tokens_per_s(blocks.shape[1])})


def _evaluate(r: _Run, valid_blocks: np.ndarray, masker: Masker, settings: PretrainSettings, on_step) -> None:
    """Held-out metrics at this step (rank 0 only; the others wait for it at the next all-reduce)."""
    if not r.ctx.is_main:
        return
    metrics = {"step": r.state["step"], **held_out_metrics(r.model, valid_blocks, masker, seed=settings.seed, batch_size=settings.batch_size,
                                                        device=r.device, bf16=r.bf16)}
    r.state["evals"].append(metrics)
    logger.info("step %d: held-out loss %.4f, perplexity %.1f, accuracy %.3f", metrics["step"],
                metrics["loss"], metrics["perplexity"], metrics["accuracy"])
    if on_step:
        on_step({"eval": True, **metrics})


def _finish(r: _Run, stopped_by: str, evaluate, block_size: int) -> PretrainResult:
    """A last evaluation and checkpoint; the model leaves in eval mode with every weight trainable."""
    r.model.bert.requires_grad_(True)
    if r.ctx.is_main and r.state["evals"][-1]["step"] != r.state["step"]:
        evaluate()
    r.state["seconds"] = r.elapsed()
    if r.checkpoints:
        r.checkpoints.save(r.model, r.optimizer, r.state)
    r.model.eval()
    return PretrainResult(steps=r.state["step"], tokens=r.state["tokens"], seconds=r.state["seconds"],
                          tokens_per_s=r.tokens_per_s(block_size), stopped_by=stopped_by, bf16=r.bf16,
                          evals=r.state["evals"], history=r.state["history"],
                          head_only_steps=min(r.state["step"], r.plan["head"]))


def _lr_factor(step: int, plan: dict) -> float:
    """10x during the head-only steps; then potluck.training.warmup_decay, counted from their end."""
    if step < plan["head"]:
        return 10.0
    return warmup_decay(step - plan["head"], plan["warmup"], plan["total"] - plan["head"])


def _train_step(forward, model, optimizer, blocks: np.ndarray, order: np.ndarray, step: int, within: int,
                masker: Masker, settings: PretrainSettings, lr: float, device, bf16: bool,
                ctx: distributed.Context) -> tuple[float, float]:
    """Optimiser step `step` (the `within`-th of its epoch) over grad_accumulation batches: (mean loss, lr).

    Every rank masks the whole global batch the same way (one seeded generator) and trains on its own
    rows of it; each rank's loss is scaled so that DDP's average of the gradients is the gradient of
    the mean loss over all masked tokens of the global batch, as in one process.
    """
    B, A = settings.batch_size, settings.grad_accumulation
    step_seed = settings.seed * 1_000_003 + step
    for group in optimizer.param_groups:
        group["lr"] = lr
    generator = torch.Generator().manual_seed(step_seed)  # masks: the same after a resume, on every rank
    torch.manual_seed(step_seed + 7919 * ctx.rank)  # dropout: the same after a resume
    total = torch.zeros(())
    for a in range(A):
        start = (within * A + a) * B
        ids = torch.from_numpy(blocks[order[np.arange(start, start + B) % len(order)]])  # (B, T)
        inputs, labels = masker(ids, generator)  # (B, T), (B, T) with -100 where nothing is predicted
        masked = max(int((labels != -100).sum()), 1)  # over the global batch
        inputs, labels = distributed.shard(inputs, ctx), distributed.shard(labels, ctx)  # this rank's rows
        sync = a == A - 1 or not ctx.enabled  # DDP all-reduces on the last micro-batch only
        with forward.no_sync() if not sync else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits, targets = forward(inputs.to(device), labels.to(device))  # (M, V), (M,)
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            (loss_sum * ctx.world_size / (masked * A)).backward()
        total += loss_sum.detach().cpu() / (masked * A)
    if ctx.enabled:
        torch.distributed.all_reduce(total)  # the global mean, the same number on every rank
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), lr


def pretrain(corpus, out: str | os.PathLike, *, settings: PretrainSettings | None = None,
             tokenizer: str | os.PathLike | None = None, base: str | None = None,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             on_step: Callable[[dict], None] | None = None, command: str | None = None,
             overwrite: bool = False) -> PretrainResult:
    """Pre-train on a `Corpus` from scratch (with `tokenizer`) or continued (from `base`); write `out`."""
    from potluck.corpus import pack_blocks
    from potluck.data import DataError
    from potluck.mlm import save_encoder
    from potluck.tokenization import check_mlm_tokenizer, load_tokenizer

    settings = settings or PretrainSettings()
    check_source(tokenizer, base)
    if distributed.context().is_main:
        check_output(out, overwrite=overwrite)  # before hours of training, not after
    if base is not None:
        from potluck.encoders import load_tokenizer as base_tokenizer

        tok = base_tokenizer(base)
        check_mlm_tokenizer(tok, str(base))
    else:
        tok = load_tokenizer(tokenizer)
    model, note, kept = build_model(tok, settings, base)
    train_docs, valid_docs = corpus.split(settings.valid_fraction, seed=settings.seed)
    ids = {"cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id}
    train_blocks = pack_blocks(tokenize_corpus(tok, train_docs.documents), settings.block_size, **ids)
    valid_blocks = pack_blocks(tokenize_corpus(tok, valid_docs.documents), settings.block_size, **ids)
    if len(train_blocks) == 0 or len(valid_blocks) == 0:
        raise DataError(f"the corpus is too small for blocks of {settings.block_size} tokens "
                        f"({len(train_blocks)} training and {len(valid_blocks)} held-out blocks)",
                        path=corpus.files[0][0] if corpus.files else None,
                        hint="add more text, or lower --block-size / raise --valid-fraction")
    logger.info("%d training blocks and %d held-out blocks of %d tokens; %s", len(train_blocks),
                len(valid_blocks), settings.block_size, note)
    masker = Masker(tok, settings.mask_probability, whole_word=settings.whole_word_mask)
    checkpoints = None
    if checkpoint_dir:
        identity = {"corpus": corpus.fingerprint(), "base": base, "tokenizer": masker.vocab_fingerprint,
                    "settings": {k: v for k, v in vars(settings).items() if k not in BUDGET_FIELDS}}
        checkpoints = PretrainCheckpoints(checkpoint_dir, identity)
    result = run(model, train_blocks, valid_blocks, masker, settings, checkpoints=checkpoints, resume=resume,
                 learning_rate=settings.peak_lr(base is not None), on_step=on_step,
                 head_steps=settings.new_head_steps if note == NEW_HEAD else 0)
    if not distributed.context().is_main:
        return result  # rank 0 writes the folder
    save_encoder(model, tok, out, result=result, settings=settings, corpus=corpus, base=base,
                 tokenizer_source=tokenizer, head_note=note, command=command, kept=kept, overwrite=overwrite,
                 blocks={"train": len(train_blocks), "valid": min(len(valid_blocks), settings.valid_blocks)})
    return result


def check_source(tokenizer, base) -> None:
    """Exactly one of: a tokenizer (from scratch) or a base (continued)."""
    if (tokenizer is None) == (base is None):
        raise UserError("give a tokenizer to pre-train from scratch, or a base to continue from (not both)",
                        hint="e.g. --tokenizer tok/ (made by `potluck tokenizer`), or --from minilm")
