"""The commons end to end: real uvicorn servers on loopback, the CLI, SQLite and a real PostgreSQL.

One server per backend (module-scoped, started by `potluck commons serve` in a subprocess) runs, in
order: the whole story (init, serve, invite, pull, finetune, push, share, work, status), eight workers
racing for twenty jobs over HTTP, and last a SIGKILL in the middle of an upload, then a restart.
"""

import collections
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from commons_helpers import BACKENDS, live_server, make_contribution, write_csv
from helpers import toy_texts
from typer.testing import CliRunner

from potluck.cli import app
from potluck.commons.client import CommonsClient
from potluck.commons.service import Commons

TINY = ["--epochs", "2", "--batch-size", "8", "--learning-rate", "3e-3", "--precision", "fp32"]


def cli(*args: str, token: str | None = None) -> str:
    """Run `potluck ...` in-process; return stdout (the test fails with the output on a non-zero exit)."""
    result = CliRunner().invoke(app, list(args), env={"POTLUCK_TOKEN": token or ""}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@dataclass
class Live:
    url: str
    root: Path
    db: str | None
    admin: str
    init_output: str
    process: object


@pytest.fixture(scope="module", params=BACKENDS)
def live(request, tmp_path_factory, tiny_encoder):
    from commons_pg import drop_database, fresh_database

    db = None if request.param == "sqlite" else fresh_database(request.getfixturevalue("postgres_server"))
    root = tmp_path_factory.mktemp("e2e") / "commons"
    output = cli("commons", "init", "--root", str(root), "--base", str(tiny_encoder), *(["--db", db] if db else []))
    with live_server(root, db) as (url, process):
        yield Live(url, root, db, output.strip().splitlines()[-1], output, process)
    if db:
        drop_database(db)


@pytest.mark.timeout(600)
def test_the_whole_story(live, tmp_path):
    assert live.admin.startswith("pk_") and "commons.db" not in live.admin
    acme = cli("commons", "invite", live.url, "--name", "acme", token=live.admin).strip()
    lender = cli("commons", "invite", live.url, "--name", "lender", token=live.admin).strip()

    cli("commons", "pull", live.url, "--out", str(tmp_path / "base"), token=acme)
    write_csv(tmp_path / "private.csv", *toy_texts(120))
    cli("finetune", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "private.csv"),
        "--out", str(tmp_path / "models" / "acme-urgency"), *TINY)
    cli("commons", "push", live.url, "--model", str(tmp_path / "models" / "acme-urgency"), "--task", "acme-urgency",
        token=acme)

    write_csv(tmp_path / "tickets.csv", *toy_texts(100, seed=5))
    cli("commons", "share", live.url, "--data", str(tmp_path / "tickets.csv"), "--task", "helpdesk-topic", token=acme)
    cli("commons", "share", live.url, "--data", str(tmp_path / "tickets.csv"), "--task", "helpdesk-topic",
        "--eval-only", token=acme)
    cli("commons", "work", live.url, "--once", "--workdir", str(tmp_path / "worker"), *TINY, token=lender)

    status = json.loads(cli("commons", "status", live.url, "--json", token=acme))
    by_kind = collections.Counter((c["kind"], c["contributor_name"], c["status"]) for c in status["contributions"])
    assert by_kind == {("weights", "acme", "accepted"): 1, ("dataset", "acme", "accepted"): 2,
                       ("weights", "lender", "accepted"): 1}
    pushed = next(c for c in status["contributions"] if c["kind"] == "weights" and c["contributor_name"] == "acme")
    from_job = next(c for c in status["contributions"] if c["contributor_name"] == "lender")
    assert pushed["base_version"] == 0 and pushed["n_examples"] == 108 and "macro_f1" in pushed["metrics"]
    assert from_job["job"] is not None and from_job["task_name"] == "helpdesk-topic"
    assert status["jobs"]["counts"] == {"done": 1}
    board = {r["contributor"]: r for r in status["leaderboard"]}
    assert board["lender"]["jobs_done"] == 1 and board["acme"]["weights"] == 1 and board["acme"]["datasets"] == 2
    assert "Leaderboard" in cli("commons", "status", live.url, token=acme)

    # the data stays home: the pushed blob holds the base's tensors and a head, and no text
    from safetensors import safe_open

    commons = Commons.open(live.root, live.db)
    spec = commons.registry.base(0).spec
    with safe_open(str(commons.store.path(pushed["blob_sha"])), "pt") as f:
        assert set(f.keys()) == set(spec) | {"head.classifier.weight", "head.classifier.bias"}
        assert set(f.metadata()) == {"format", "base_version", "base_sha256", "labels", "n_examples", "metrics", "task"}
    commons.registry.close()


@pytest.mark.timeout(300)
def test_eight_workers_race_for_twenty_jobs_over_http(live, tmp_path):
    admin = CommonsClient(live.url, live.admin)
    owner = CommonsClient(live.url, admin.invite("race-owner")["token"])
    write_csv(tmp_path / "d.csv", *toy_texts(40))
    jobs = [owner.share(tmp_path / "d.csv", "race")["job"]["id"] for _ in range(20)]
    commons = Commons.open(live.root, live.db)
    contribution = make_contribution(commons, tmp_path / "result.safetensors", task="race")
    commons.registry.close()
    workers = [CommonsClient(live.url, admin.invite(f"racer-{i}")["token"]) for i in range(8)]
    done, errors, start = collections.Counter(), [], threading.Barrier(8)

    def work(client):
        try:
            start.wait()
            while (lease := client.lease("racer")) is not None:
                client.heartbeat(lease["id"], lease["lease_id"])
                done[client.submit(lease["id"], lease["lease_id"], contribution)["job"]] += 1
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(done) == sorted(jobs) and set(done.values()) == {1}
    assert all(j["status"] == "done" for j in admin.get("/v1/jobs") if j["id"] in jobs)


@pytest.mark.timeout(300)
def test_a_server_killed_during_an_upload_leaves_nothing_behind(live, tmp_path):
    """Runs last on `live`: SIGKILL its server mid-upload, then restart it on the same root and database."""
    commons = Commons.open(live.root, live.db)
    blobs_before, records_before = commons.store.list(), commons.registry.contributions()
    data = make_contribution(commons, tmp_path / "c.safetensors", noise=1e-2, seed=7).read_bytes()
    client = CommonsClient(live.url, live.admin)
    client.ensure_task("killed-upload", ["calm", "urgent"])
    stall, failure = threading.Event(), []

    def slow_body():
        yield data[: len(data) // 2]
        stall.wait(60)  # the second half never comes before the kill
        yield data[len(data) // 2:]

    def upload():
        try:
            client.request("POST", "/v1/tasks/killed-upload/weights", content=slow_body(),
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        except Exception as err:
            failure.append(err)

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 0 for p in commons.store.tmp.iterdir()):
        assert time.monotonic() < deadline, "the upload never reached the server"
        time.sleep(0.05)
    live.process.kill()  # SIGKILL: no clean-up code runs
    live.process.wait()
    stall.set()
    thread.join(30)
    assert failure, "the upload should have failed with the server"
    half_written = list(commons.store.tmp.iterdir())
    assert len(half_written) == 1 and half_written[0].stat().st_size < len(data)
    assert commons.store.list() == blobs_before  # no blob appeared
    assert commons.registry.contributions() == records_before  # and no record

    with live_server(live.root, live.db) as (url, _server):  # the restarted server sweeps the temp file
        assert list(commons.store.tmp.iterdir()) == []
        client = CommonsClient(url, live.admin)
        assert len(client.status()["contributions"]) == len(records_before)
        (tmp_path / "again.safetensors").write_bytes(data)
        record = client.upload("/v1/tasks/killed-upload/weights", tmp_path / "again.safetensors")
        assert record["status"] == "accepted"
    commons.registry.close()
