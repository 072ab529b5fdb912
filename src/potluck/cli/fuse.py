"""potluck fuse: fine-tuned encoder bodies merged into a new base (heads are never fused)."""

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from potluck.cli.options import OverwriteOption, with_settings
from potluck.cli.render import console, out
from potluck.fileio import check_output
from potluck.fusion import FusionSettings  # dataclasses and safetensors only

app = typer.Typer()


@app.command()
@with_settings(FusionSettings, "Fusion")
def fuse(
    models: Annotated[list[Path], typer.Argument(help="model folders fine-tuned from one base")],
    out_dir: Annotated[Path, typer.Option("--out", help="the fused encoder folder to write")],
    base: Annotated[str | None, typer.Option(
        help="the base they were fine-tuned from (default: the one their potluck.json records)")] = None,
    overwrite: OverwriteOption = False,
    **settings,
):
    """Fuse the encoder bodies of fine-tuned models into a new base encoder (heads are never fused)."""
    from potluck.fusion import fuse as fuse_models

    fusion_settings = FusionSettings(**settings)
    check_output(out_dir, overwrite=overwrite)
    result = fuse_models(models, out_dir, base=base, settings=fusion_settings,
                         command=shlex.join(["potluck", *sys.argv[1:]]), overwrite=overwrite)
    table = Table("model", "weight", "‖θ−θ_base‖ / ‖θ_base‖", "head tensors left out", title="inputs")
    for record in result.meta["inputs"]:
        table.add_row(record["path"], f"{record['weight']:.3f}", f"{record['task_vector_norm']:.4f}",
                      str(len(record["heads_left_out"])))
    out.print(table)
    console.print(f"fused {len(models)} models by [bold]{result.method}[/]: {result.n_tensors} tensors "
                  f"from base {result.meta['parent']['base']} "
                  f"({json.dumps(result.meta['parameters'])}) in {result.seconds:.1f} s")
    console.print(f"saved [bold]{out_dir}[/]: fine-tune it as a base with "
                  f"potluck finetune --base {out_dir} --data ... --out ...")
