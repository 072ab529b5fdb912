"""Options built from the settings dataclasses, and the option types several command groups share."""

import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def with_settings(cls, panel: str):
    """Add one CLI option per field of a settings dataclass (help from the field's metadata).

    The decorated command receives them in **kwargs; the dataclass stays the one place they are defined.
    """
    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        for f in fields(cls):
            kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
            option = typer.Option(help=f.metadata.get("help"), rich_help_panel=panel)
            default = f.default if f.default is not MISSING else None
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[kind, option]))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return decorate


def without_option(argv: list[str], name: str) -> list[str]:
    """argv less `name VALUE` / `name=VALUE` (to hand the rest of a command line to torchrun)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


CorpusOption = Annotated[list[Path], typer.Option("--corpus", help="text files or folders, JSONL/CSV/TSV/Parquet with a text column (repeat for more)")]
PerFileOption = Annotated[bool, typer.Option(help="each plain-text file is one document (default: each line)")]
