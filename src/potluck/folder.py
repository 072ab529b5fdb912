"""The model folder: checked on load, and its potluck.json, card and atomic write in one place.

    from potluck.folder import read_config, load_tensors, check_tensors, check_tokenizer
    config = read_config(folder)                   # config.json: valid JSON, an object
    tensors = load_tensors(folder)                 # safetensors only, every value finite
    check_tensors(folder, tensors, expected)       # the names and shapes config.json implies
    check_tokenizer(folder, config)                # a tokenizer whose ids fit the embeddings

Potluck never answers from a broken folder: a missing tensor is not initialised at random, a missing
tokenizer is not replaced by a default one, a config that does not match its weights is refused, and
NaN or infinite weights are refused before the first prediction (they would answer NaN).

    meta = new_meta("potluck.classifier/1", name="urgency", base="minilm", ...)
    write_folder("models/urgency", meta, lambda tmp: model.save_pretrained(tmp))   # + potluck.json, README.md
    read_meta("models/urgency")                                                  # potluck.json, checked
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from potluck.errors import UserError

HEADS = ("classifier.", "cls.", "lm_head.", "score.", "qa_outputs.", "pre_classifier.")  # task heads a body may carry
RESAVE = "the folder is damaged or its files do not belong together: copy or train it again"


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a model folder as a dict; UserError with line and column for broken JSON."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        if not folder.exists():
            raise UserError(f"no such model folder: {folder}", hint="pass the --out folder of `potluck finetune`")
        raise UserError(f"{folder} is not a model folder (no config.json)", hint="pass the --out folder of `potluck finetune`")
    return _json_object(path)


def _json_object(path: Path) -> dict:
    """A JSON file holding an object; a UserError with line and column when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text", hint=RESAVE) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})", hint=RESAVE) from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a JSON object was expected", hint=RESAVE)
    return value


def load_tensors(folder: str | os.PathLike) -> dict:
    """Every tensor of the folder's safetensors file(s), each checked finite. Pickles are never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict = {}
    for path in weight_files(Path(folder)):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: not a readable safetensors file ({err})",
                            hint="copy it again; a pickle renamed to .safetensors is never loaded") from None
    check_finite(folder, tensors.items())
    return tensors


def check_finite(where: str | os.PathLike, tensors: Iterable) -> None:
    """UserError at the first floating-point tensor of (name, tensor) pairs holding NaN or inf."""
    import torch

    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{where}: tensor {name} holds {bad} non-finite values (NaN or inf)", hint=RESAVE)


def check_tensors(folder: str | os.PathLike, tensors: Mapping, expected: Mapping[str, tuple],
                  optional: Iterable[str] = ()) -> None:
    """The tensors are exactly those `expected` (name -> shape) by config.json; `optional` names may be absent
    or present."""
    optional = set(optional)
    where = Path(folder) / "model.safetensors"
    missing = sorted(set(expected) - set(tensors) - optional)
    if missing:
        raise UserError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all) for the model "
                        "config.json describes", hint=RESAVE)
    extra = sorted(set(tensors) - set(expected) - optional)
    if extra:
        raise UserError(f"{where}: tensor {extra[0]} is not part of the model config.json describes "
                        f"({len(extra)} such tensors)", hint=RESAVE)
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)} where config.json "
                            f"implies {tuple(shape)}", hint=RESAVE)


def check_labels(folder: str | os.PathLike, config: dict, head_rows: int) -> None:
    """config.json's id2label names one label per row of the head, with ids 0..n-1."""
    id2label = config.get("id2label") or {}
    try:
        ids = sorted(int(i) for i in id2label)
    except (TypeError, ValueError):
        raise UserError(f"{Path(folder) / 'config.json'}: id2label keys must be the integers 0..n-1", hint=RESAVE) from None
    if ids != list(range(head_rows)):
        raise UserError(f"{Path(folder) / 'config.json'}: id2label names {len(ids)} labels but the head has "
                        f"{head_rows} rows", hint=RESAVE)


def check_tokenizer(folder: str | os.PathLike, config: dict) -> None:
    """A tokenizer is there (tokenizer.json, or vocab.txt for a slow one) and its ids fit the embeddings."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "vocab.txt").is_file():
            return
        raise UserError(f"{folder} has no tokenizer (tokenizer.json)",
                        hint="copy the tokenizer files written with the model into the folder")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})", hint=RESAVE) from None
    vocab = (spec.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
    ids += [t.get("id", 0) for t in spec.get("added_tokens") or [] if isinstance(t, dict)]
    size = config.get("vocab_size")
    if not ids:
        raise UserError(f"{path}: the tokenizer has no vocabulary", hint=RESAVE)
    if isinstance(size, int) and max(ids) >= size:
        raise UserError(f"{path}: token id {max(ids)} is outside the model's {size} word embeddings "
                        "(the tokenizer is not the model's)", hint=RESAVE)


def load_pretrained(model_class, source: str | os.PathLike, *, name: str | None = None,
                    may_lack: tuple[str, ...] = (), may_add: tuple[str, ...] = (), **kwargs):
    """`model_class.from_pretrained(source)` (safetensors only), refusing what transformers would patch up:
    a tensor it lacks (initialised at random) unless its name contains one of `may_lack` (a new head), a
    tensor of the wrong shape, one the model does not use unless it contains one of `may_add` (another
    head), and a non-finite value. Returns (model, loading info); every refusal is one UserError line."""
    name = name or str(source)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(source, use_safetensors=True, output_loading_info=True,
                                                      **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name}: cannot load it as a model ({first})", hint=RESAVE) from None
    problems = [("lacks tensor", [k for k in info.get("missing_keys", []) if not any(p in k for p in may_lack)]),
                ("has a tensor of the wrong shape:", [k[0] if isinstance(k, tuple) else k
                                                       for k in info.get("mismatched_keys", [])]),
                ("has a tensor its config does not use:",
                 [k for k in info.get("unexpected_keys", []) if not any(p in k for p in may_add)])]
    for what, keys in problems:
        if keys:
            raise UserError(f"{name} {what} {sorted(keys)[0]} ({len(keys)} in all)", hint=RESAVE)
    missing = set(info.get("missing_keys", []))
    check_finite(name, ((k, v) for k, v in model.state_dict().items() if k not in missing))
    return model, info


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars off for the block (a library talks through logging;
    Potluck checks and reports what matters itself); its own settings are put back after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder; UserError when there are none (pickles are refused)."""
    if not folder.is_dir():
        raise UserError(f"no such model folder: {folder}", hint="pass folders written by `potluck finetune`")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing or not shards:
            raise UserError(f"{index}: shard {missing[0] if missing else '(none listed)'} is missing",
                            hint="copy the whole model folder")
        return [folder / s for s in shards]
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = (f"found {', '.join(pickled)}: pickles, which Potluck never loads; re-save with safetensors"
            if pickled else "pass folders written by `potluck finetune` or save_pretrained")
    raise UserError(f"{folder} has no model.safetensors", hint=hint)


def max_length_of(folder: str | os.PathLike) -> int:
    """The max_length a model folder was trained with (potluck.json), else 128."""
    return int(read_meta(folder).get("settings", {}).get("max_length", 128))


# -- potluck.json, the card and the atomic write: one owner ----------------------------------------

def new_meta(fmt: str, **fields) -> dict:
    """A potluck.json record: its format ('potluck.classifier/1', 'potluck.encoder/1', ...), the Potluck
    version and the time it was made, then `fields` in order."""
    from datetime import UTC, datetime

    from potluck import __version__

    return {"format": fmt, "potluck_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **fields}


def read_meta(folder: str | os.PathLike) -> dict:
    """A folder's potluck.json ({} when it has none); a UserError with line and column when it is broken."""
    path = Path(folder) / "potluck.json"
    return _json_object(path) if path.is_file() else {}


def write_folder(path: str | os.PathLike, meta: dict, fill, *, overwrite: bool = False, card: bool = True,
                 log: list[dict] | None = None) -> Path:
    """Write a folder atomically (potluck.fileio.atomic_folder): `fill(tmp)` writes the weights, config and
    tokenizer; then potluck.json = `meta`, README.md = its model card (potluck.modelcard) and, with `log`,
    training_log.jsonl. An existing non-empty folder is replaced only with `overwrite`."""
    from potluck import modelcard
    from potluck.fileio import atomic_folder, atomic_write_json

    with atomic_folder(path, overwrite=overwrite) as tmp, quiet_transformers():
        fill(tmp)
        atomic_write_json(tmp / "potluck.json", meta)
        if card:
            (tmp / "README.md").write_text(modelcard.render(meta), encoding="utf-8")
        if log:
            (tmp / "training_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return Path(path)
