"""The registry on SQLite and on a real PostgreSQL: records, ownership, and compute leases under contention."""

import collections
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from potluck.commons.errors import Conflict, Forbidden, LeaseLost, Unauthorized
from potluck.commons.models import Job, utcnow
from potluck.commons.registry import Registry, sqlite_url

SHA = "a" * 64


@pytest.fixture
def registry(tmp_path, db_url):
    registry = Registry(db_url or sqlite_url(tmp_path))
    registry.create_schema()
    yield registry
    registry.close()


def people(registry):
    admin, _ = registry.add_contributor("admin", "admin")
    acme, acme_token = registry.add_contributor("acme", "contributor")
    return admin, acme, acme_token


def queue(registry, actor, n: int, task_name: str = "helpdesk") -> list[int]:
    task = registry.put_task(task_name, ["a", "b"], actor)
    return [registry.accept_dataset(actor=actor, task=task, n_train=10, n_eval=2, blob_sha=SHA, eval_sha=SHA,
                                    eval_only=False, details={})[1].id for _ in range(n)]


def finish(registry, actor, job):
    task = registry.task(job.task)
    return registry.accept_weights(actor=actor, task=task, base_version=0, n_examples=10, metrics={"f1": 0.5},
                                   blob_sha=SHA, head_sha=SHA, labels=["a", "b"], details={}, job=job.id,
                                   lease_id=job.lease_id)


def expire(registry, job_ids, after: float = -1) -> None:
    """Set the leases of `job_ids` to run out `after` seconds from now (the past by default)."""
    with registry.transaction() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(lease_expires=utcnow() + timedelta(seconds=after)))


def test_contributors_tokens_and_bases(registry):
    admin, acme, token = people(registry)
    assert registry.authenticate(token).name == "acme"
    with pytest.raises(Unauthorized):
        registry.authenticate(token + "x")
    with pytest.raises(Conflict, match="already exists"):
        registry.add_contributor("acme", "reader")
    assert all(c.token_hash != token for c in registry.contributors())  # only the hash is kept
    first = registry.add_base(manifest_sha=SHA, weights_sha=SHA, spec={}, method="init")
    second = registry.add_base(manifest_sha=SHA, weights_sha=SHA, spec={}, method="fusion:mean", parent=0,
                               status="candidate", lineage={"contributions": [1, 2]})
    assert (first.version, second.version) == (0, 1)
    assert registry.current_base().version == 0  # a candidate is not current until promoted
    registry.set_base_status(1, "promoted", {"scores": {"helpdesk": 0.8}})
    assert registry.current_base().version == 1 and registry.base(1).lineage["scores"] == {"helpdesk": 0.8}


def test_a_contributor_changes_only_its_own_tasks(registry):
    admin, acme, _ = people(registry)
    other, _ = registry.add_contributor("globex", "contributor")
    reader, _ = registry.add_contributor("viewer", "reader")
    registry.put_task("acme-urgency", ["calm", "urgent"], acme)
    with pytest.raises(Forbidden, match="belongs to acme"):
        registry.put_task("acme-urgency", ["calm", "urgent", "x"], other)
    with pytest.raises(Forbidden, match="belongs to acme"):
        registry.task_for_write("acme-urgency", other)
    with pytest.raises(Forbidden, match="reader"):
        registry.put_task("viewer-task", ["a", "b"], reader)
    assert registry.task_for_write("acme-urgency", admin).name == "acme-urgency"  # admins may
    registry.put_task("acme-urgency", ["calm", "urgent", "x"], acme)  # its owner may, until it is used
    assert registry.task("acme-urgency").labels == ["calm", "urgent", "x"]


def test_expired_leases_go_back_to_the_queue(registry):
    admin, acme, _ = people(registry)
    registry.add_base(manifest_sha=SHA, weights_sha=SHA, spec={}, method="init")
    [job_id] = queue(registry, acme, 1)
    first = registry.lease_job(acme, "killed-worker", lease_seconds=0.5)
    assert first.id == job_id and first.status == "leased" and first.base_version == 0
    expire(registry, [job_id], after=60)  # (so that the next check cannot race the clock on a busy machine)
    assert registry.lease_job(acme, "other") is None  # held: nothing else to lease
    expire(registry, [job_id])  # the worker was killed: no heartbeat, the lease runs out
    second = registry.lease_job(acme, "second-worker", lease_seconds=30)
    assert second.id == job_id and second.attempts == 2 and second.lease_id != first.lease_id
    with pytest.raises(LeaseLost):  # the first worker comes back: its lease is gone
        registry.heartbeat(job_id, first.lease_id, acme)
    with pytest.raises(LeaseLost):
        finish(registry, acme, first)
    assert registry.contributions(kind="weights") == []  # its result was not recorded
    registry.heartbeat(job_id, second.lease_id, acme, lease_seconds=30)
    finish(registry, acme, second)
    job = registry.job(job_id)
    assert job.status == "done" and job.result is not None


def test_a_job_fails_after_max_attempts_and_failures_requeue(registry):
    admin, acme, _ = people(registry)
    [job_id] = queue(registry, acme, 1)
    lease = registry.lease_job(acme, "w", max_attempts=2)
    assert registry.release_job(job_id, lease.lease_id, acme, error="out of memory", max_attempts=2).status == "queued"
    lease = registry.lease_job(acme, "w", max_attempts=2)
    expire(registry, [lease.id])
    assert registry.requeue_expired(max_attempts=2) == 0
    job = registry.job(job_id)
    assert job.status == "failed" and "expired 2 times" in job.error
    assert registry.lease_job(acme, "w") is None


def test_readers_do_not_lend_compute(registry):
    reader, _ = registry.add_contributor("viewer", "reader")
    with pytest.raises(Forbidden):
        registry.lease_job(reader, "w")


@pytest.mark.timeout(120)
def test_eight_workers_racing_for_twenty_jobs_never_do_one_twice(registry):
    """Half of the jobs were leased by a worker that died: the racers also requeue those, concurrently."""
    admin, acme, _ = people(registry)
    registry.add_base(manifest_sha=SHA, weights_sha=SHA, spec={}, method="init")
    workers = [registry.add_contributor(f"worker-{i}", "contributor")[0] for i in range(8)]
    job_ids = queue(registry, acme, 20)
    dead = [registry.lease_job(acme, "killed", lease_seconds=60).id for _ in range(10)]  # never heard from again
    expire(registry, dead)  # their leases run out: the racing workers requeue them concurrently
    leased, done, errors = collections.Counter(), collections.Counter(), []
    start = threading.Barrier(8)

    def work(actor):
        try:
            start.wait()
            while (job := registry.lease_job(actor, actor.name)) is not None:
                leased[job.id] += 1
                finish(registry, actor, job)
                done[job.id] += 1
        except Exception as err:  # any error fails the test below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(done) == sorted(job_ids) and set(done.values()) == {1} and set(leased.values()) == {1}
    results = [c for c in registry.contributions(kind="weights")]
    assert sorted(c["job"] for c in results) == sorted(job_ids)
    assert all(j.status == "done" for j in registry.jobs())
    assert {j.id: j.attempts for j in registry.jobs()} == {i: 2 if i in dead else 1 for i in job_ids}
