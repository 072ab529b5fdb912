"""Options built from the settings dataclasses, and the option types several command groups share."""

import inspect
import sys
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


def spread_over(nproc: int) -> bool:
    """--nproc N: run this command again under torchrun on N processes of this machine; True when it did
    (the caller returns), False to go on in this process (one process, or already a torchrun rank)."""
    from potluck import distributed
    from potluck.errors import UserError

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and not distributed.context().enabled:
        distributed.launch(nproc, without_option(sys.argv[1:], "--nproc"))
        return True
    return False


NprocOption = Annotated[int, typer.Option(help="training processes on this machine (spawns torchrun)")]
OverwriteOption = Annotated[bool, typer.Option(help="replace --out if it exists and is not empty")]


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
