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
import os
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from potluck.errors import UserError
from potluck.fileio import atomic_folder, atomic_write_json
from potluck.finetune import _optimizer_from_tensors, _optimizer_to_tensors, check_same_settings

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


class PretrainCheckpoints:
    """The latest checkpoint in `folder/step-NNNNNNN`: model and AdamW state in safetensors, the rest in
    JSON. Written under a temporary name and renamed, so a kill leaves the previous one intact. Resume
    refuses a checkpoint made with another corpus, base, tokenizer or settings (budgets may change)."""

    def __init__(self, folder: str | os.PathLike, identity: dict):
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def save(self, model, optimizer, state: dict) -> None:
        final = self.folder / f"step-{state['step']:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied decoder / embedding weights
        tensors, meta = _optimizer_to_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", {**self.identity, **state, "optimizer": meta})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)

    def restore(self, model, optimizer) -> dict | None:
        latest = self.latest()
        if latest is None:
            logger.info("no checkpoint in %s: starting from the beginning", self.folder)
            return None
        saved = json.loads((latest / "state.json").read_text())
        for key, what in (("corpus", "another corpus"), ("base", "another base"), ("tokenizer", "another tokenizer")):
            if saved.get(key) != self.identity[key]:
                raise UserError(f"the checkpoint in {self.folder} was made with {what}",
                                hint="resume with the same inputs, or drop --resume to start afresh")
        check_same_settings(saved["settings"], self.identity["settings"], self.folder,
                            hint="resume with the same options (only the budgets may change), or drop --resume")
        missing, unexpected = load_model(model, str(latest / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise UserError(f"the checkpoint {latest} does not fit the model", hint="drop --resume to start afresh")
        _optimizer_from_tensors(optimizer, load_file(latest / "optimizer.safetensors"), saved["optimizer"])
        logger.info("resumed from %s (step %d)", latest, saved["step"])
        return {k: saved[k] for k in ("step", "tokens", "seconds", "history", "evals")}


def save_encoder(model, tokenizer, out: str | os.PathLike, *, result, settings, corpus, base: str | None,
                 tokenizer_source: str | os.PathLike | None, head_note: str, blocks: dict, command: str | None,
                 kept: dict | None = None, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder: config, weights, tokenizer, potluck.json, README.md, training_log.jsonl.

    `kept` tensors (the base's pooler) are added to model.safetensors: BertForMaskedLM ignores them and
    BertForSequenceClassification picks them up, as with Google's BERT checkpoints.
    """
    from potluck import __version__

    config = model.config
    final = result.evals[-1]
    meta = {
        "format": "potluck.encoder/1", "name": Path(out).name, "potluck_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": base or "scratch", "tokenizer": str(tokenizer_source or base), "head": head_note,
        "kept_from_base": sorted(kept or {}),
        "size": None if base else settings.size,
        "architecture": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                         "heads": config.num_attention_heads, "vocab": config.vocab_size,
                         "parameters": model.num_parameters()},
        "corpus": {"fingerprint": corpus.fingerprint(), "documents": len(corpus),
                   "characters": corpus.n_characters(), "files": len(corpus.files), "blocks": blocks,
                   "block_size": settings.block_size},
        "training": {"steps": result.steps, "encoder_steps": result.encoder_steps,
                     "head_only_steps": result.head_only_steps, "tokens": result.tokens,
                     "seconds": round(result.seconds, 1),
                     "tokens_per_s": round(result.tokens_per_s, 1), "stopped_by": result.stopped_by,
                     "precision": "bf16" if result.bf16 else "fp32"},
        "metrics": {"held_out": final, "held_out_start": result.evals[0]},
        "settings": asdict(settings),
        "command": command,
    }
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if kept:
            weights = load_file(tmp / "model.safetensors")
            save_file({**weights, **{k: v.contiguous() for k, v in kept.items()}}, tmp / "model.safetensors",
                      metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "potluck.json", meta)
        (tmp / "README.md").write_text(model_card(meta), encoding="utf-8")
        (tmp / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.history + result.evals))
    logger.info("saved %s", out)
    return Path(out)


def model_card(meta: dict) -> str:
    """README.md for a pre-trained encoder, from its potluck.json."""
    a, c, t = meta["architecture"], meta["corpus"], meta["training"]
    end, start = meta["metrics"]["held_out"], meta["metrics"]["held_out_start"]
    origin = (f"pre-trained from scratch (size `{meta['size']}`)" if meta["base"] == "scratch"
              else f"continued from `{meta['base']}`")
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: fill-mask", "tags: [potluck, fill-mask, bert]", "---", "",
        f"# {meta.get('name') or 'Potluck encoder'}", "",
        f"A BERT encoder {origin} by masked-language modelling with Potluck {meta['potluck_version']}. "
        f"{a['layers']} layers, hidden size {a['hidden']}, {a['heads']} heads, vocabulary {a['vocab']}, "
        f"{a['parameters'] / 1e6:.1f}M parameters. Head: {meta['head']}.", "",
        "## Corpus", "",
        f"- {c['documents']} documents from {c['files']} file(s), {c['characters']} characters, "
        f"fingerprint `{c['fingerprint'][:16]}`",
        f"- {c['blocks']['train']} training blocks of {c['block_size']} tokens; "
        f"{c['blocks']['valid']} held-out blocks from documents never trained on", "",
        "## Training", "",
        f"- {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s ({t['tokens_per_s']:.0f} tokens/s, "
        f"{t['precision']}); stopped by {t['stopped_by']}", "",
        "| held-out | loss | perplexity | masked-token accuracy |", "|---|---|---|---|",
        f"| at the start | {start['loss']:.4f} | {start['perplexity']:.1f} | {start['accuracy']:.4f} |",
        f"| final (step {end['step']}) | {end['loss']:.4f} | {end['perplexity']:.1f} | {end['accuracy']:.4f} |", "",
        "## How it was made", "", "```", meta.get("command") or "potluck.pretrain.pretrain(...) from Python", "```", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in meta["settings"].items()), "",
        "## Use", "", "```",
        'potluck fill THIS_FOLDER "The payment was [MASK] twice."',
        "potluck finetune --base THIS_FOLDER --data train.csv --out models/x", "```", "",
        'or with transformers: `pipeline("fill-mask", model=THIS_FOLDER)`. '
        "Fine-tuning drops the masked-LM head and adds a classification head.", "",
    ])
