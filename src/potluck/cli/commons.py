"""potluck commons …: share datasets, lend compute, push weights, run fusion rounds, see the state of it."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from potluck.cli.options import OverwriteOption, with_settings
from potluck.cli.render import commons_tables, console, out
from potluck.cli.serve import check_port_free
from potluck.commons.round_settings import RoundSettings  # a light module: dataclasses only
from potluck.commons.settings import CommonsSettings  # a light module: dataclasses only
from potluck.finetune import FinetuneSettings

app = typer.Typer(help="The commons: organisations share datasets, lend compute and push weights "
                       "to a shared base encoder.", no_args_is_help=True)

Url = Annotated[str, typer.Argument(help="the commons, e.g. http://127.0.0.1:8700")]
Token = Annotated[str | None, typer.Option(envvar="POTLUCK_TOKEN", show_default=False,
                                           help="your token (default: $POTLUCK_TOKEN)")]
Db = Annotated[str | None, typer.Option(envvar="POTLUCK_COMMONS_DB", show_default=False,
                                        help="a PostgreSQL URL (default: SQLite in the root)")]


def commons_client(url: str, token: str | None):
    from potluck.commons.client import CommonsClient

    return CommonsClient(url, token)


@app.command("init")
def commons_init(
    root: Annotated[Path, typer.Option(help="a new folder for the commons (blobs, and the SQLite database)")],
    base: Annotated[str, typer.Option(help="version 0 of the shared base: 'minilm', an encoder folder or a hub id")] = "minilm",
    db: Db = None,
    admin: Annotated[str, typer.Option(help="the admin's name")] = "admin",
):
    """Create a commons with `--base` as version 0; print the admin token (shown this once)."""
    from potluck.commons.service import Commons

    commons, token = Commons.create(root, base, db, admin)
    base_v0 = commons.registry.current_base()
    console.print(f"created the commons in [bold]{root}[/] ({commons.describe()['database']}); base version 0 "
                  f"from {base}: {len(base_v0.spec)} tensors, weights sha256 {base_v0.weights_sha[:16]}…")
    console.print(f"the token of admin [bold]{admin}[/] (shown once; keep it secret, pass it as --token or "
                  "POTLUCK_TOKEN):")
    out.print(token, highlight=False)


@app.command("serve")
@with_settings(CommonsSettings, "Limits")
def commons_serve(
    root: Annotated[Path, typer.Option(help="the folder made by `potluck commons init`")],
    port: Annotated[int, typer.Option(help="TCP port")] = 8700,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    db: Db = None,
    **settings,
):
    """Serve the commons' HTTP API (/v1; OpenAPI docs at /docs)."""
    import uvicorn

    from potluck.commons.api import create_app
    from potluck.commons.service import Commons

    check_port_free(host, port)
    commons = Commons.open(root, db, CommonsSettings(**settings))
    console.print(f"serving the commons in [bold]{root}[/] ({commons.registry.engine.dialect.name}) on "
                  f"http://{host}:{port}  (API docs: /docs)")
    uvicorn.run(create_app(commons), host=host, port=port, log_level="warning")


@app.command("invite")
def commons_invite(
    url: Url,
    name: Annotated[str, typer.Option(help="the new contributor's name (a-z, 0-9, '-')")],
    role: Annotated[str, typer.Option(help="'contributor', 'reader' or 'admin'")] = "contributor",
    token: Token = None,
):
    """Admin: add a contributor and print its token (shown this once)."""
    with commons_client(url, token) as client:
        who = client.invite(name, role)
    console.print(f"invited [bold]{who['name']}[/] as {who['role']}; its token (shown once):")
    out.print(who["token"], highlight=False)


@app.command("pull")
def commons_pull(
    url: Url,
    out_dir: Annotated[Path, typer.Option("--out", help="the folder to write (a base `potluck finetune --base` takes)")],
    version: Annotated[int | None, typer.Option(help="a base version (default: the current one)")] = None,
    token: Token = None,
    overwrite: OverwriteOption = False,
):
    """Download a base encoder as a Hugging Face folder, checking every file's sha256."""
    with commons_client(url, token) as client:
        info = client.pull(out_dir, version, overwrite=overwrite)
    console.print(f"pulled base version {info['version']} ({info['method']}) into [bold]{out_dir}[/]; "
                  f"fine-tune it with: potluck finetune --base {out_dir} --data … --out …")


@app.command("push")
def commons_push(
    url: Url,
    model: Annotated[Path, typer.Option(help="a model folder from `potluck finetune --base <pulled base>`")],
    task: Annotated[str, typer.Option(help="your task's name (created if new; a-z, 0-9, '-')")],
    base_version: Annotated[int | None, typer.Option(help="the base version it was fine-tuned from "
                                                          "(default: recorded in its config.json)")] = None,
    examples: Annotated[int | None, typer.Option(help="examples it was trained on (default: from potluck.json)")] = None,
    token: Token = None,
):
    """Contribute a fine-tuned encoder's weights and head (safetensors only; the data stays home)."""
    with commons_client(url, token) as client:
        record = client.push(model, task, base_version=base_version, n_examples=examples)
    change = record["details"].get("relative_change", 0.0)
    console.print(f"contribution {record['id']} accepted: weights for task [bold]{task}[/] on base version "
                  f"{record['base_version']} ({record['n_examples']} examples, weights moved {change:.2%})")


@app.command("share")
def commons_share(
    url: Url,
    data: Annotated[Path, typer.Option(help="labelled data: .csv, .tsv, .jsonl or .parquet")],
    task: Annotated[str, typer.Option(help="your task's name (created if new; a-z, 0-9, '-')")],
    eval_only: Annotated[bool, typer.Option(help="only for judging new bases, never trained on")] = False,
    eval_fraction: Annotated[float | None, typer.Option(help="share held back for evaluation (default: the commons')")] = None,
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    token: Token = None,
):
    """Share a labelled dataset the commons may train on (checked like `potluck finetune`'s data)."""
    with commons_client(url, token) as client:
        result = client.share(data, task, text_column=text_column, label_column=label_column,
                              eval_only=eval_only, eval_fraction=eval_fraction)
    c, job = result["contribution"], result["job"]
    kept = f"{c['n_examples']} to train on, {c['n_eval']} held back for evaluation"
    console.print(f"dataset {c['id']} accepted for task [bold]{task}[/]: {kept}"
                  + (f"; queued as job {job['id']}" if job else " (evaluation only)"))


@app.command("work")
@with_settings(FinetuneSettings, "Training")
def commons_work(
    url: Url,
    token: Token = None,
    once: Annotated[bool, typer.Option(help="do at most one job, then stop")] = False,
    max_jobs: Annotated[int | None, typer.Option(help="stop after this many jobs")] = None,
    until_empty: Annotated[bool, typer.Option(help="stop when no job is queued (instead of waiting)")] = False,
    poll: Annotated[float, typer.Option(help="seconds between asks when no job is queued")] = 30.0,
    workdir: Annotated[Path, typer.Option(help="where bases and scratch files go")] = Path(".potluck-worker"),
    **settings,
):
    """Lend compute: lease a job, fine-tune the current base on its data, upload the weights, repeat."""
    from potluck.commons.worker import Worker

    def report(r: dict) -> None:
        extra = f"contribution {r['contribution']}" if r["status"] == "done" else r.get("error", "")
        console.print(f"job {r['job']} ({r['task']}, base {r['base_version']}): {r['status']} {extra}")

    with commons_client(url, token) as client:
        worker = Worker(client, workdir, FinetuneSettings(**settings), poll=poll)
        console.print(f"worker {worker.name} asking {url} for jobs")
        results = worker.run(max_jobs=max_jobs, once=once, until_empty=until_empty, on_result=report)
    console.print(f"{sum(r['status'] == 'done' for r in results)} of {len(results)} job(s) done")


@app.command("round")
@with_settings(RoundSettings, "Round")
def commons_round(url: Url, token: Token = None, **settings):
    """Admin: fuse the unfused accepted weights on the current base into a candidate; promote it only if
    the gate says it is at least as good (runs in the request; the answer says what happened and why)."""
    from potluck.commons.client import CommonsClient

    with CommonsClient(url, token, timeout=24 * 3600.0) as client:
        result = client.round(**RoundSettings(**settings).to_dict())
    if result["outcome"] == "skipped":
        console.print(f"no round: {result['reason']}")
        return
    if not result.get("scores"):  # the gate could not score the candidate
        console.print(f"candidate base version {result['candidate_version']} {result['reason']}")
        return
    scores = Table("task", f"base v{result['parent']}", f"candidate v{result['candidate_version']}", "change",
                   title=f"Round: {len(result['contributions'])} contribution(s) fused by {result['method']}")
    for task, s in result["scores"].items():
        scores.add_row(task, f"{s['current']:.4f}", f"{s['candidate']:.4f}", f"{s['candidate'] - s['current']:+.4f}")
    scores.add_row("mean", f"{result['mean_current']:.4f}", f"{result['mean_candidate']:.4f}",
                   f"{result['mean_candidate'] - result['mean_current']:+.4f}")
    out.print(scores)
    console.print(f"candidate base version {result['candidate_version']} {result['reason']}"
                  + (f"; heads refitted for {', '.join(h['task'] for h in result['heads'])}" if result["heads"] else ""))
    if result.get("released"):
        console.print(f"its {len(result['released'])} contribution(s) were given back for the next round "
                      "(a robust --method such as median can outvote a poisoner)")


@app.command("status")
def commons_status(
    url: Url,
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON")] = False,
):
    """Bases, tasks, contributions, jobs and the leaderboard."""
    with commons_client(url, token) as client:
        status = client.status()
    if as_json:
        out.print_json(json.dumps(status))
        return
    for table in commons_tables(status):
        out.print(table)
