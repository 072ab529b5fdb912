"""Lending compute: the worker runs a job, hands back a failed one, and uploads nothing once its lease is lost.

On SQLite only: leases on PostgreSQL are tested in test_commons_registry.py, and a worker against a
PostgreSQL-backed server in test_commons_e2e.py.
"""

import time
from datetime import timedelta

import pytest
from commons_helpers import write_csv
from helpers import toy_texts
from sqlalchemy import update

from potluck.commons.models import Job, utcnow
from potluck.commons.worker import Worker
from potluck.finetune import FinetuneSettings

TINY = FinetuneSettings(epochs=1, batch_size=8, learning_rate=3e-3, precision="fp32")
pytestmark = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])


@pytest.fixture
def job(made, tmp_path):
    acme = made.client(made.invite("acme"))
    return acme.share(write_csv(tmp_path / "d.csv", *toy_texts(80)), "helpdesk-topic")["job"]["id"]


@pytest.mark.timeout(120)
def test_a_failed_job_goes_back_then_a_worker_does_it(made, job, tmp_path, monkeypatch):
    worker = Worker(made.client(made.invite("lender")), tmp_path / "worker", TINY)

    def broken(*args):
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(Worker, "train", broken)
    [result] = worker.run(once=True)
    assert result["status"] == "failed" and "GPU caught fire" in result["error"]
    record = made.commons.registry.job(job)
    assert record.status == "queued" and record.attempts == 1 and "GPU caught fire" in record.error
    monkeypatch.undo()
    [result] = worker.run(until_empty=True)
    assert result["status"] == "done"
    record = made.commons.registry.job(job)
    assert record.status == "done" and record.attempts == 2
    weights = made.commons.registry.contribution(result["contribution"])
    assert weights.job == job and weights.base_version == 0 and weights.status == "accepted"
    assert (tmp_path / "worker" / "bases" / "v0" / "commons.json").is_file()  # the base is kept for next time


@pytest.mark.timeout(120)
def test_a_worker_whose_lease_was_lost_uploads_nothing(made, job, tmp_path, monkeypatch):
    made.commons.settings.lease_seconds = 1.5  # heartbeats every 0.5 s
    registry = made.commons.registry
    thief, _ = registry.add_contributor("thief", "contributor")
    taken = {}

    def lease_taken_away(self, lease, base, scratch, beat):
        with registry.transaction() as s:  # the commons stopped hearing from us: the lease expired
            s.execute(update(Job).where(Job.id == lease["id"]).values(lease_expires=utcnow() - timedelta(seconds=1)))
        taken["job"] = registry.lease_job(thief, "thief", lease_seconds=60)
        deadline = time.monotonic() + 20
        while not beat.lost:  # the next heartbeat learns it
            assert time.monotonic() < deadline, "the heartbeat never noticed"
            time.sleep(0.05)
        beat.check()  # what the training loop's on_step does: raises LeaseLost

    monkeypatch.setattr(Worker, "train", lease_taken_away)
    worker = Worker(made.client(made.invite("lender")), tmp_path / "worker", TINY)
    [result] = worker.run(once=True)
    assert result["status"] == "lease lost"
    assert taken["job"].id == job and registry.job(job).leased_by == thief.id
    assert registry.contributions(kind="weights") == []
