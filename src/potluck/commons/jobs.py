"""Compute leases: workers lease jobs with a heartbeat; a lease that expires goes back to the queue.

    job = registry.lease_job(actor, worker="host-4242", lease_seconds=600)    # a Job, or None when idle
    registry.heartbeat(job.id, job.lease_id, actor, lease_seconds=600)       # LeaseLost once it expired
    registry.accept_weights(..., job=job.id, lease_id=job.lease_id)           # the result: job done
    registry.release_job(job.id, job.lease_id, actor, error="out of memory")  # back to the queue

Two workers never hold the same job. On PostgreSQL the lease picks the oldest queued job with
`SELECT … FOR UPDATE SKIP LOCKED`, so concurrent leases lock different rows without waiting on each other;
on SQLite every transaction begins with `BEGIN IMMEDIATE` (see `registry.make_engine`), which serialises
writers. On both, the claiming UPDATE re-checks `status = 'queued'` and its row count, and every later
step (heartbeat, result, release) must present the lease's random id and find it unexpired, so a worker
whose lease expired and went to someone else cannot finish the job a second time.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from sqlalchemy import select, update

from potluck.commons.auth import role_allows
from potluck.commons.errors import Conflict, Forbidden, LeaseLost, NotFound
from potluck.commons.models import BaseVersion, Contributor, Job, utcnow

logger = logging.getLogger(__name__)

FREED = dict(lease_id=None, leased_by=None, worker="", lease_expires=None)  # a job back in the queue


class JobsMixin:
    """Job queue methods of `Registry` (which provides `transaction()` and `is_postgres`)."""

    def lease_job(self, actor: Contributor, worker: str, *, lease_seconds: float = 600,
                  max_attempts: int = 3) -> Job | None:
        """Lease the oldest queued job to `actor` with the current base, or return None when none is queued."""
        if not role_allows(actor.role, "contributor"):
            raise Forbidden(f"{actor.name} is a {actor.role}: only contributors and admins lend compute")
        lease_id = secrets.token_hex(16)
        for _ in range(1000):
            with self.transaction() as s:
                now = utcnow()
                self._requeue_expired(s, now, max_attempts)
                base = s.scalar(select(BaseVersion.version).where(BaseVersion.status == "promoted")
                                .order_by(BaseVersion.version.desc()).limit(1))
                pick = select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(1)
                if self.is_postgres:
                    pick = pick.with_for_update(skip_locked=True)
                job_id = s.scalar(pick)
                if job_id is None:
                    return None
                claimed = s.execute(
                    update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(status="leased", lease_id=lease_id, leased_by=actor.id, worker=worker[:128],
                            lease_expires=now + timedelta(seconds=lease_seconds), heartbeat=now,
                            attempts=Job.attempts + 1, base_version=base)
                    .execution_options(synchronize_session=False)).rowcount
                if claimed == 1:
                    job = s.get(Job, job_id)
                    logger.info("leased job %d to %s (%s)", job_id, actor.name, worker)
                    return job
            # another worker claimed that row between our select and update: try the next one
        raise Conflict("could not lease a job after many tries; try again")

    def requeue_expired(self, max_attempts: int = 3) -> int:
        """Put jobs whose lease expired back in the queue (or fail them after `max_attempts`)."""
        with self.transaction() as s:
            return self._requeue_expired(s, utcnow(), max_attempts)

    def _requeue_expired(self, s, now, max_attempts: int) -> int:
        expired = select(Job.id).where(Job.status == "leased", Job.lease_expires < now)
        if self.is_postgres:  # leave rows another lease is handling to it: no waiting, no deadlock
            expired = expired.with_for_update(skip_locked=True)
        ids = list(s.scalars(expired))
        if not ids:
            return 0
        s.execute(update(Job).where(Job.id.in_(ids), Job.attempts >= max_attempts)
                  .values(status="failed", finished=now, error=f"the lease expired {max_attempts} times "
                          "(workers died or lost contact)", **FREED)
                  .execution_options(synchronize_session=False))
        requeued = s.execute(update(Job).where(Job.id.in_(ids), Job.status == "leased")
                             .values(status="queued", **FREED)
                             .execution_options(synchronize_session=False)).rowcount
        if requeued:
            logger.info("put %d job(s) with an expired lease back in the queue", requeued)
        return requeued

    def _valid_lease(self, job_id: int, lease_id: str | None, actor: Contributor, now):
        return (Job.id == job_id, Job.lease_id == lease_id, Job.leased_by == actor.id,
                Job.status == "leased", Job.lease_expires >= now)

    def heartbeat(self, job_id: int, lease_id: str, actor: Contributor, *, lease_seconds: float = 600) -> Job:
        """Extend a lease that is still held; raise LeaseLost otherwise."""
        with self.transaction() as s:
            now = utcnow()
            n = s.execute(update(Job).where(*self._valid_lease(job_id, lease_id, actor, now))
                          .values(heartbeat=now, lease_expires=now + timedelta(seconds=lease_seconds))
                          .execution_options(synchronize_session=False)).rowcount
            if n != 1:
                raise LeaseLost(f"the lease on job {job_id} expired or went to another worker")
            return s.get(Job, job_id)

    def check_lease(self, job_id: int, lease_id: str, actor: Contributor) -> Job:
        """The job, if `actor` holds its lease `lease_id` and it has not expired."""
        with self.transaction() as s:
            job = s.scalar(select(Job).where(*self._valid_lease(job_id, lease_id, actor, utcnow())))
        if job is None:
            raise LeaseLost(f"no valid lease {lease_id!r} on job {job_id}: it expired or went to another worker")
        return job

    def _finish_job(self, s, job_id: int, lease_id: str | None, actor: Contributor, *, result: int) -> None:
        """Mark a leased job done (inside the transaction that records its result)."""
        now = utcnow()
        n = s.execute(update(Job).where(*self._valid_lease(job_id, lease_id, actor, now))
                      .values(status="done", result=result, finished=now, lease_expires=None)
                      .execution_options(synchronize_session=False)).rowcount
        if n != 1:
            raise LeaseLost(f"the lease on job {job_id} expired or went to another worker; its result "
                            "was not recorded")

    def release_job(self, job_id: int, lease_id: str, actor: Contributor, *, error: str,
                    max_attempts: int = 3) -> Job:
        """Give a leased job back after a failure: queued again, or failed after `max_attempts`."""
        with self.transaction() as s:
            now = utcnow()
            valid = self._valid_lease(job_id, lease_id, actor, now)
            n = s.execute(update(Job).where(*valid, Job.attempts >= max_attempts)
                          .values(status="failed", error=error[:2000], finished=now, **FREED)
                          .execution_options(synchronize_session=False)).rowcount
            n += s.execute(update(Job).where(*valid).values(status="queued", error=error[:2000], **FREED)
                           .execution_options(synchronize_session=False)).rowcount
            if n != 1:
                raise LeaseLost(f"the lease on job {job_id} expired or went to another worker")
            return s.get(Job, job_id)

    def job(self, job_id: int) -> Job:
        with self.transaction() as s:
            job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def jobs(self, status: str | None = None, limit: int = 1000) -> list[Job]:
        query = select(Job).order_by(Job.id).limit(limit)
        if status is not None:
            query = query.where(Job.status == status)
        with self.transaction() as s:
            return list(s.scalars(query))
