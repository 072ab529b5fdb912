"""The model card: README.md in a model folder, written from potluck.json so they never disagree.
One module renders every kind: a classifier (fine-tuned, or a head on a frozen encoder), a pre-trained
encoder, a fused encoder."""

from __future__ import annotations

import json

FROZEN_NOTE = ("\n## Head\n\nThe encoder was not fine-tuned: the head is a logistic regression on its pooler "
               "output, written into the `classifier` layer (temperature folded in).\n")


def render(meta: dict) -> str:
    """README.md for the folder potluck.json `meta` describes."""
    if meta.get("format") == "potluck.classifier/1":
        frozen = (meta.get("head") or {}).get("encoder") == "frozen"
        return classifier_card(meta) + (FROZEN_NOTE if frozen else "")
    if meta.get("kind") == "fused":
        return fused_card(meta)
    return encoder_card(meta)


def classifier_card(meta: dict) -> str:
    """Markdown for a fine-tuned classifier, with the Hugging Face metadata header."""
    labels = meta["classes"]
    data = meta.get("data", {})
    cal = meta.get("calibration", {})
    valid = meta.get("metrics", {}).get("valid", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [potluck, text-classification]",
        "---",
        "",
        f"# {meta.get('name', 'Potluck classifier')}",
        "",
        f"A text classifier fine-tuned with Potluck {meta.get('potluck_version', '')} from the base "
        f"encoder `{meta['base']}`. Its probabilities are calibrated by temperature scaling, and the "
        "temperature is folded into the head, so plain `transformers` gives the same probabilities.",
        "",
        "## Labels",
        "",
        ", ".join(f"`{label}`" for label in labels),
        "",
        "## Data",
        "",
        f"- training file: `{data.get('train_path', '(in memory)')}`, {data.get('n_train', '?')} examples, "
        f"fingerprint `{data.get('fingerprint', '?')[:16]}`",
        f"- validation: {data.get('valid_source', '?')}, {data.get('n_valid', '?')} examples",
        "",
        "## Metrics (validation split)",
        "",
        "| accuracy | macro-F1 | ECE before calibration | ECE after |",
        "|---|---|---|---|",
        f"| {valid.get('accuracy', float('nan')):.4f} | {valid.get('macro_f1', float('nan')):.4f} "
        f"| {cal.get('ece_before', float('nan')):.4f} | {cal.get('ece_after', float('nan')):.4f} |",
        "",
        f"Temperature: {cal.get('temperature', 1.0):.4f} (folded into the classifier weights).",
        "",
        "## How it was made",
        "",
        "```",
        meta.get("command") or "TextClassifier(...).fit(...) from Python",
        "```",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items()),
        "",
        "## Use",
        "",
        "```",
        "potluck predict THIS_FOLDER \"a text to classify\"",
        "```",
        "",
        "or with transformers: `pipeline(\"text-classification\", model=THIS_FOLDER, top_k=None)`.",
        "",
    ]
    return "\n".join(lines)


def encoder_card(meta: dict) -> str:
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


def fused_card(meta: dict) -> str:
    """README.md for a fused encoder: its parent base, method and inputs."""
    rows = "\n".join(f"| `{i['path']}` | {i['weight']:.3f} | {i['task_vector_norm']:.4f} | `{i['sha256'][:12]}` |"
                     for i in meta["inputs"])
    return (f"---\nlibrary_name: transformers\ntags: [potluck, fused-encoder]\n---\n\n# Fused encoder\n\n"
            f"The bodies of {len(meta['inputs'])} models fine-tuned from `{meta['parent']['base']}`, fused by "
            f"**{meta['method']}** {json.dumps(meta['parameters'])} with Potluck {meta['potluck_version']}. "
            "Heads are not fused: fine-tune this folder as a base (`potluck finetune --base THIS_FOLDER`).\n\n"
            "| input | weight | ‖θ−θ_base‖/‖θ_base‖ | sha256 |\n|---|---|---|---|\n" + rows + "\n")
