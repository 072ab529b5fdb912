"""One command line: potluck finetune | predict | evaluate | ...

    potluck finetune --data emails.csv --text-column body --label-column urgency --out models/urgency
    potluck predict models/urgency "The server is down and customers cannot pay"
    potluck evaluate models/urgency --data test.jsonl

The library logs; this module talks (progress bars, tables). A user's mistake (`UserError`) is one
line on stderr and exit code 2, never a traceback.
"""

import logging
import os
import sys
from typing import Annotated

import typer

from potluck.cli import classify, commons, fuse, pretrain, serve
from potluck.cli.options import with_settings  # noqa: F401  (part of the package's interface)
from potluck.cli.render import console
from potluck.errors import UserError

app = typer.Typer(help="Potluck: transfer learning for text, built together.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False, add_completion=False)
for group in (classify, pretrain, serve, fuse):
    app.add_typer(group.app)  # their commands at the top level: potluck finetune, potluck serve, ...
app.add_typer(commons.app, name="commons")


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RANK", "0") != "0":
        level = logging.ERROR  # under torchrun only rank 0 talks
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)])
    # what runs instead of what was asked (potluck.hardware) is one line, however wide the terminal
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("note: %(message)s"))
    hardware_log = logging.getLogger("potluck.hardware")
    hardware_log.handlers, hardware_log.propagate = [notes], False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' load reports and progress bars are for developers, not users. Set through its
    # environment variables when it is not imported yet: `potluck predict` may never import it.
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what the library does")] = False):
    setup_logging(verbose)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what the library does")] = False):
    setup_logging(verbose)


def main() -> None:
    """The console script: run the app, turning a user's mistake into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except UserError as err:
        from potluck import distributed

        if os.environ.get(distributed.ERROR_DIR):
            distributed.report_error(str(err))  # `--nproc`: the launcher prints it once, for every rank
        else:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
