"""The model card: README.md in a model folder, written from potluck.json so they never disagree."""

from __future__ import annotations


def render(meta: dict) -> str:
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
