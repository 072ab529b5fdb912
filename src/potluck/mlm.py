"""The parts of masked-LM pre-training around the loop: masking, the sparse MLM head, checkpoints, and
the output folder with its model card. `potluck.pretrain` runs the loop.

    masker = Masker(tokenizer, 0.15, whole_word=True)
    inputs, labels = masker(blocks, generator)          # (B, T) each; labels -100 where not predicted
    logits, targets = mlm_logits(model, inputs, labels)  # (M, V), (M,) for the M masked positions
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from potluck import distributed
from potluck.errors import UserError
from potluck.folder import load_pretrained, new_meta, write_folder
from potluck.training import CheckpointFolder, load_optimizer, optimizer_tensors

logger = logging.getLogger(__name__)


class Masker:
    """BERT's masking: choose `probability` of the tokens (or of the words), then replace 80 % of the
    chosen with [MASK], 10 % with a random ordinary token, and keep 10 %.

    Written here rather than taken from transformers' DataCollatorForLanguageModeling because (1) its
    whole-word masking needs the character offsets of the original text, which packed blocks no longer
    have, and it drops the 80/10/10 split; we find word starts from the vocabulary's "##" pieces, as
    Google's BERT does; (2) masks come from a generator the loop seeds per step, so a resumed run sees
    exactly the masks it would have seen; (3) random replacements are drawn from ordinary tokens only.
    """

    def __init__(self, tokenizer, probability: float = 0.15, *, whole_word: bool = False):
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values()) + 1)
        self.probability = probability
        self.whole_word = whole_word
        self.mask_id = tokenizer.mask_token_id
        self.special = torch.zeros(size, dtype=torch.bool)  # (V,)
        self.special[torch.tensor(tokenizer.all_special_ids)] = True
        self.continuation = torch.zeros(size, dtype=torch.bool)  # (V,) True for "##" pieces
        for token, index in vocab.items():
            if token.startswith("##"):
                self.continuation[index] = True
        if whole_word and not self.continuation.any():
            raise UserError("whole-word masking needs a WordPiece vocabulary with '##' pieces, and this one has none",
                            hint="drop --whole-word-mask")
        self.ordinary = (~self.special).nonzero().squeeze(1)  # (V',) ids random replacements come from
        digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode())
        self.vocab_fingerprint = digest.hexdigest()

    def __call__(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for a (B, T) int64 batch; labels are -100 where nothing is to be predicted."""
        special = self.special[ids]  # (B, T)
        draw = torch.rand(ids.shape, generator=generator)  # (B, T)
        if self.whole_word:
            # every piece of a word takes the draw of the word's first piece
            starts = ~self.continuation[ids] | special  # (B, T)
            positions = torch.arange(ids.shape[1]).expand_as(ids)  # (B, T)
            first = torch.where(starts, positions, 0).cummax(dim=1).values  # (B, T)
            draw = draw.gather(1, first)
        chosen = (draw < self.probability) & ~special  # (B, T)
        if not chosen.any():  # a tiny batch can draw nothing: predict its least-drawn token
            chosen.view(-1)[(draw + 2.0 * special).view(-1).argmin()] = True
        labels = torch.where(chosen, ids, -100)
        action = torch.rand(ids.shape, generator=generator)  # (B, T)
        inputs = ids.clone()
        inputs[chosen & (action < 0.8)] = self.mask_id
        randomised = chosen & (action >= 0.8) & (action < 0.9)
        picks = torch.randint(len(self.ordinary), (int(randomised.sum()),), generator=generator)
        inputs[randomised] = self.ordinary[picks]
        return inputs, labels


def mlm_logits(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLM head's logits at the masked positions only: (M, V) logits and (M,) targets.

    `BertForMaskedLM.forward` projects every position onto the vocabulary; on CPU that projection is
    a large share of the work, and 85 % of it is thrown away. Packed blocks have no padding, so no
    attention mask is passed (the fastest attention path).
    """
    hidden = model.bert(input_ids=inputs).last_hidden_state  # (B, T, H)
    where = labels != -100  # (B, T)
    return model.cls(hidden[where]), labels[where]  # (M, V), (M,)


class _MaskedLM(torch.nn.Module):
    """`mlm_logits` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mlm_logits(self.model, inputs, labels)


def wrap_for_ddp(model, ctx: distributed.Context) -> torch.nn.Module:
    """`mlm_logits` as a module, in DistributedDataParallel under torchrun."""
    module = _MaskedLM(model)
    return torch.nn.parallel.DistributedDataParallel(module) if ctx.enabled else module


@torch.inference_mode()
def held_out_metrics(model, blocks: np.ndarray, masker: Masker, *, seed: int, batch_size: int, device,
                     bf16: bool) -> dict:
    """Masked-token loss, perplexity and accuracy on held-out blocks, with the same masks every time."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed + 99_991)
    loss_sum, correct, n = 0.0, 0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start:start + batch_size])  # (B, T)
        inputs, labels = masker(ids, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, targets = mlm_logits(model, inputs.to(device), labels.to(device))  # (M, V), (M,)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        n += len(targets)
    model.train(was_training)
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(n, 1),
            "masked_tokens": n}


class PretrainCheckpoints:
    """The latest checkpoint in `folder/step-NNNNNNN` (potluck.training.CheckpointFolder): model and AdamW
    state in safetensors, the rest in JSON. Resume refuses a checkpoint made with another corpus, base,
    tokenizer or settings (the budgets may change)."""

    def __init__(self, folder: str | os.PathLike, identity: dict):
        self.folder = CheckpointFolder(folder, "step", identity)

    def save(self, model, optimizer, state: dict) -> None:
        tensors, meta = optimizer_tensors(optimizer)
        files = {"model.safetensors": lambda path: save_model(model, str(path)),  # tied decoder / embeddings
                 "optimizer.safetensors": tensors}
        self.folder.write(state["step"], files, {**state, "optimizer": meta})

    def restore(self, model, optimizer) -> dict | None:
        latest, saved = self.folder.read(
            {"corpus": "another corpus", "base": "another base", "tokenizer": "another tokenizer"},
            hint="resume with the same inputs and options (only the budgets may change), or drop --resume")
        if latest is None:
            return None
        missing, unexpected = load_model(model, str(latest / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise UserError(f"the checkpoint {latest} does not fit the model", hint="drop --resume to start afresh")
        load_optimizer(optimizer, latest / "optimizer.safetensors", saved["optimizer"])
        logger.info("resumed from %s (step %d)", latest, saved["step"])
        return {k: saved[k] for k in ("step", "tokens", "seconds", "history", "evals")}


def save_encoder(model, tokenizer, out: str | os.PathLike, *, result, settings, corpus, base: str | None,
                 tokenizer_source: str | os.PathLike | None, head_note: str, blocks: dict, command: str | None,
                 kept: dict | None = None, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder: config, weights, tokenizer, potluck.json, README.md, training_log.jsonl.

    `kept` tensors (the base's pooler) are added to model.safetensors: BertForMaskedLM ignores them and
    BertForSequenceClassification picks them up, as with Google's BERT checkpoints.
    """
    config = model.config
    final = result.evals[-1]
    meta = new_meta(
        "potluck.encoder/1", name=Path(out).name, base=base or "scratch",
        tokenizer=str(tokenizer_source or base), head=head_note, kept_from_base=sorted(kept or {}),
        size=None if base else settings.size,
        architecture={"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                      "heads": config.num_attention_heads, "vocab": config.vocab_size,
                      "parameters": model.num_parameters()},
        corpus={"fingerprint": corpus.fingerprint(), "documents": len(corpus), "characters": corpus.n_characters(),
                "files": len(corpus.files), "blocks": blocks, "block_size": settings.block_size},
        training={"steps": result.steps, "encoder_steps": result.encoder_steps,
                  "head_only_steps": result.head_only_steps, "tokens": result.tokens,
                  "seconds": round(result.seconds, 1), "tokens_per_s": round(result.tokens_per_s, 1),
                  "stopped_by": result.stopped_by, "precision": "bf16" if result.bf16 else "fp32"},
        metrics={"held_out": final, "held_out_start": result.evals[0]},
        settings=asdict(settings), command=command)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if kept:
            weights = load_file(tmp / "model.safetensors")
            save_file({**weights, **{k: v.contiguous() for k, v in kept.items()}}, tmp / "model.safetensors",
                      metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    write_folder(out, meta, fill, overwrite=overwrite, log=result.history + result.evals)
    logger.info("saved %s", out)
    return Path(out)


def fill_mask(folder: str | os.PathLike, texts: str | list[str], top_k: int = 5) -> list:
    """Top-k fillers of each [MASK]: one text in, a list (one per mask) of [{token, score, sequence}] out."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json)", hint="pass the --out folder of `potluck pretrain`")
    if not 1 <= top_k <= 100:
        raise UserError(f"top_k {top_k} is out of range", hint="use 1 to 100")
    model, info = load_pretrained(AutoModelForMaskedLM, path, may_lack=(".predictions.", "lm_head", "cls."),
                                  may_add=("pooler.", "classifier."))
    if any(".predictions." in key or "lm_head" in key for key in info["missing_keys"]):
        raise UserError(f"{path} has no masked-LM head (an encoder without one, or a classifier)",
                        hint=f"give it one with `potluck pretrain --from {path} ...`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    single = isinstance(texts, str)
    for text in [texts] if single else texts:
        if tokenizer.mask_token not in text:
            raise UserError(f"no {tokenizer.mask_token} in {text!r}", hint=f"put {tokenizer.mask_token} where a word is missing")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=top_k)
    answers = []
    for text in [texts] if single else texts:
        found = fill(text)
        per_mask = found if found and isinstance(found[0], list) else [found]
        answers.append([[{"token": r["token_str"].strip(), "score": float(r["score"]), "sequence": r["sequence"]}
                         for r in mask] for mask in per_mask])
    return answers[0] if single else answers
