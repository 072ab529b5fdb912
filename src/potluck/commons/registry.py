"""The registry: the commons' records in SQLAlchemy 2, on SQLite (the default) or PostgreSQL.

    registry = Registry("sqlite:///commons/commons.db")         # or "postgresql://user@host:5432/db"
    registry.create_schema()
    admin, token = registry.add_contributor("admin", "admin")   # the token is returned once, stored hashed
    base = registry.current_base()

Every method is one transaction and returns detached records (columns loaded, no lazy loads) or plain
dicts (`view`) ready for JSON. Permission rules that depend on records (a contributor changes only its own
tasks) live here, next to the queries; the API checks roles. Job leasing is in `jobs.py`, the
whole picture (`status`, the leaderboard) in `overview.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from potluck.commons.auth import check_name, check_role, hash_token, new_token, role_allows
from potluck.commons.errors import CommonsError, Conflict, Forbidden, NotFound, Unauthorized
from potluck.commons.jobs import JobsMixin
from potluck.commons.models import (
    SCHEMA_VERSION,
    Base,
    BaseVersion,
    Contribution,
    Contributor,
    Job,
    Meta,
    Task,
    TaskHead,
    utcnow,
    view,
)
from potluck.commons.overview import OverviewMixin, use_of

logger = logging.getLogger(__name__)

MAX_LABELS = 1000


def normalize_url(url: str) -> str:
    """'postgresql://…' and 'postgres://…' use psycopg 3; other SQLAlchemy URLs pass unchanged."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def sqlite_url(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'commons.db'}"


def make_engine(url: str):
    """An engine with the settings the commons relies on (WAL and write-locking transactions on SQLite)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                               pool_size=16, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
            cursor = dbapi_connection.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=60000"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            # Take the write lock at the start: a transaction that reads then writes cannot deadlock or
            # interleave with another writer (SQLite has no SELECT ... FOR UPDATE).
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=16, max_overflow=32, pool_pre_ping=True)


def check_labels(labels: Any) -> list[str]:
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise CommonsError(f"a task needs a list of 2 to {MAX_LABELS} labels")
    if not all(isinstance(x, str) and x.strip() and len(x) <= 200 for x in labels) or len(set(labels)) != len(labels):
        raise CommonsError("labels must be distinct, non-empty strings of at most 200 characters")
    return list(labels)


def check_metrics(metrics: Any) -> dict[str, float]:
    """Reported metrics: at most 64 names, each a finite number."""
    if not isinstance(metrics, dict) or len(metrics) > 64:
        raise CommonsError("metrics must be an object of at most 64 name: number pairs")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 64 or isinstance(value, bool) \
                or not isinstance(value, int | float) or not math.isfinite(value):
            raise CommonsError(f"metric {name!r} must be a finite number")
        out[name] = float(value)
    return out


class Registry(JobsMixin, OverviewMixin):
    """The commons' records behind one SQLAlchemy engine."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)
        with self.transaction() as s:
            if s.get(Meta, "schema_version") is None:
                s.add_all([Meta(key="schema_version", value=str(SCHEMA_VERSION)),
                           Meta(key="created", value=utcnow().isoformat(timespec="seconds"))])

    def close(self) -> None:
        self.engine.dispose()

    # -- contributors ---------------------------------------------------------------------------

    def add_contributor(self, name: str, role: str, invited_by: int | None = None) -> tuple[Contributor, str]:
        """A new contributor and its token (returned this once; only its hash is stored)."""
        check_name(name, "contributor name")
        check_role(role)
        token = new_token()
        record = Contributor(name=name, role=role, token_hash=hash_token(token), invited_by=invited_by)
        try:
            with self.transaction() as s:
                s.add(record)
        except IntegrityError:
            raise Conflict(f"a contributor named {name!r} already exists") from None
        logger.info("added contributor %s (%s)", name, role)
        return record, token

    def authenticate(self, token: str) -> Contributor:
        with self.transaction() as s:
            who = s.scalar(select(Contributor).where(Contributor.token_hash == hash_token(token)))
        if who is None or not who.active:
            raise Unauthorized("unknown or revoked token")
        return who

    def contributors(self) -> list[Contributor]:
        with self.transaction() as s:
            return list(s.scalars(select(Contributor).order_by(Contributor.id)))

    def _names(self, s: Session) -> dict[int, str]:
        return dict(s.execute(select(Contributor.id, Contributor.name)).all())

    # -- base versions --------------------------------------------------------------------------

    def add_base(self, *, manifest_sha: str, weights_sha: str, spec: dict, method: str,
                 parent: int | None = None, lineage: dict | None = None, status: str = "promoted",
                 created_by: int | None = None) -> BaseVersion:
        """Record the next base version (0 for the first)."""
        for _ in range(5):  # two writers may pick the same next number: the primary key decides
            try:
                with self.transaction() as s:
                    newest = s.scalar(select(func.max(BaseVersion.version)))
                    version = 0 if newest is None else newest + 1
                    record = BaseVersion(version=version, parent=parent, status=status, method=method,
                                         manifest_sha=manifest_sha, weights_sha=weights_sha, spec=spec,
                                         lineage=lineage or {}, created_by=created_by)
                    s.add(record)
                return record
            except IntegrityError:
                continue
        raise Conflict("could not allocate a base version number; try again")

    def base(self, version: int | None = None) -> BaseVersion:
        """A base version, or the current one (the newest promoted) when `version` is None."""
        with self.transaction() as s:
            if version is None:
                record = s.scalar(select(BaseVersion).where(BaseVersion.status == "promoted")
                                  .order_by(BaseVersion.version.desc()).limit(1))
            else:
                record = s.get(BaseVersion, version)
        if record is None:
            raise NotFound("this commons has no base yet" if version is None else f"no base version {version}")
        return record

    def current_base(self) -> BaseVersion:
        return self.base(None)

    def bases(self) -> list[BaseVersion]:
        with self.transaction() as s:
            return list(s.scalars(select(BaseVersion).order_by(BaseVersion.version)))

    def set_base_status(self, version: int, status: str, lineage: dict | None = None) -> BaseVersion:
        """Promote or reject a candidate base, merging `lineage` (e.g. the gate's scores) into its record."""
        if status not in ("candidate", "promoted", "rejected"):
            raise CommonsError(f"unknown base status {status!r}")
        with self.transaction() as s:
            record = s.get(BaseVersion, version)
            if record is None:
                raise NotFound(f"no base version {version}")
            record.status = status
            record.lineage = {**record.lineage, **(lineage or {})}
        return record

    # -- tasks ----------------------------------------------------------------------------------

    def put_task(self, name: str, labels: list[str], actor: Contributor, description: str = "") -> Task:
        """Create a task owned by `actor`, or update one it owns (admins may update any)."""
        check_name(name, "task name")
        labels = check_labels(labels)
        if not role_allows(actor.role, "contributor"):
            raise Forbidden(f"{actor.name} is a {actor.role}: only contributors and admins create tasks")
        try:
            with self.transaction() as s:
                task = s.scalar(select(Task).where(Task.name == name))
                if task is None:
                    task = Task(name=name, labels=labels, description=description[:2000], owner=actor.id)
                    s.add(task)
                    return task
                self._check_owner(task, actor, s)
                if sorted(task.labels) != sorted(labels):
                    used = s.scalar(select(func.count(Contribution.id)).where(
                        Contribution.task == task.id, Contribution.status == "accepted"))
                    if used:
                        raise Conflict(f"task {name!r} has labels {task.labels} and {used} accepted "
                                       "contribution(s); its labels cannot change")
                    task.labels = labels
                task.description = description[:2000] or task.description
                return task
        except IntegrityError:  # created by someone else in the meantime
            return self.task_for_write(name, actor)

    def _check_owner(self, task: Task, actor: Contributor, s: Session) -> None:
        if task.owner != actor.id and actor.role != "admin":
            owner = s.get(Contributor, task.owner)
            raise Forbidden(f"task {task.name!r} belongs to {owner.name if owner else 'someone else'}: "
                            "a contributor changes only its own tasks")

    def task(self, name: str | int) -> Task:
        """A task by name (or by id)."""
        with self.transaction() as s:
            task = s.get(Task, name) if isinstance(name, int) else s.scalar(select(Task).where(Task.name == name))
        if task is None:
            raise NotFound(f"no task named {name!r}")
        return task

    def task_for_write(self, name: str, actor: Contributor) -> Task:
        """The task, if `actor` may contribute to it (its owner, or an admin)."""
        if not role_allows(actor.role, "contributor"):
            raise Forbidden(f"{actor.name} is a {actor.role}: readers cannot contribute")
        with self.transaction() as s:
            task = s.scalar(select(Task).where(Task.name == name))
            if task is None:
                raise NotFound(f"no task named {name!r}")
            self._check_owner(task, actor, s)
        return task

    def tasks(self) -> list[dict]:
        """Every task with its accepted (`contributions`) and `rejected` counts and a `state`.

        A task made for a push that was then rejected stays: the rejection's record names it. Its state,
        "rejected only", says so, rather than leaving an unexplained orphan ("empty": nothing arrived).
        """
        with self.transaction() as s:
            names = self._names(s)
            counts = {(task, status): n for task, status, n in s.execute(
                select(Contribution.task, Contribution.status, func.count(Contribution.id))
                .group_by(Contribution.task, Contribution.status))}
            tasks = list(s.scalars(select(Task).order_by(Task.id)))
        out = []
        for t in tasks:
            accepted, rejected = counts.get((t.id, "accepted"), 0), counts.get((t.id, "rejected"), 0)
            state = "active" if accepted else "rejected only" if rejected else "empty"
            out.append(view(t, owner_name=names.get(t.owner), contributions=accepted, rejected=rejected, state=state))
        return out

    # -- contributions --------------------------------------------------------------------------

    def reject(self, *, kind: str, actor: Contributor, task: Task, reason: str,
               base_version: int | None = None, job: int | None = None, details: dict | None = None) -> Contribution:
        """Record a rejected contribution and why (no bytes of it are kept)."""
        record = Contribution(kind=kind, contributor=actor.id, task=task.id, base_version=base_version,
                              status="rejected", reason=reason[:2000], job=job, details=details or {})
        with self.transaction() as s:
            s.add(record)
        logger.info("rejected %s contribution from %s to %s: %s", kind, actor.name, task.name, reason)
        return record

    def accept_weights(self, *, actor: Contributor, task: Task, base_version: int, n_examples: int,
                       metrics: dict, blob_sha: str, head_sha: str, labels: list[str], details: dict,
                       job: int | None = None, lease_id: str | None = None) -> Contribution:
        """Record accepted weights and the task's head on that base; a job's result also finishes the job."""
        record = Contribution(kind="weights", contributor=actor.id, task=task.id, base_version=base_version,
                              n_examples=n_examples, metrics=check_metrics(metrics), status="accepted",
                              blob_sha=blob_sha, head_sha=head_sha, job=job, details=details)
        with self.transaction() as s:
            s.add(record)
            s.flush()
            s.add(TaskHead(task=task.id, base_version=base_version, blob_sha=head_sha, labels=labels,
                           contribution=record.id, metrics=record.metrics))
            if job is not None:
                self._finish_job(s, job, lease_id, actor, result=record.id)
        return record

    def accept_dataset(self, *, actor: Contributor, task: Task, n_train: int, n_eval: int,
                       blob_sha: str | None, eval_sha: str, eval_only: bool, details: dict,
                       settings: dict | None = None) -> tuple[Contribution, Job | None]:
        """Record an accepted dataset; unless it is for evaluation only, queue a job to train on it."""
        record = Contribution(kind="dataset", contributor=actor.id, task=task.id, n_examples=n_train,
                              n_eval=n_eval, status="accepted", blob_sha=blob_sha, eval_sha=eval_sha,
                              eval_only=eval_only, details=details)
        job = None
        with self.transaction() as s:
            s.add(record)
            s.flush()
            if not eval_only:
                job = Job(dataset=record.id, task=task.id, settings=settings or {})
                s.add(job)
        return record, job

    def contribution(self, contribution_id: int) -> Contribution:
        with self.transaction() as s:
            record = s.get(Contribution, contribution_id)
        if record is None:
            raise NotFound(f"no contribution {contribution_id}")
        return record

    def contributions(self, *, task: str | None = None, kind: str | None = None, status: str | None = None,
                      base_version: int | None = None, limit: int = 1000) -> list[dict]:
        """Contributions, newest first, with contributor and task names."""
        query = select(Contribution, Task.name).join(Task, Task.id == Contribution.task)
        for column, value in ((Task.name, task), (Contribution.kind, kind), (Contribution.status, status),
                              (Contribution.base_version, base_version)):
            if value is not None:
                query = query.where(column == value)
        with self.transaction() as s:
            names = self._names(s)
            bases = dict(s.execute(select(BaseVersion.version, BaseVersion.status)).all())
            current = max((v for v, status in bases.items() if status == "promoted"), default=None)
            rows = s.execute(query.order_by(Contribution.id.desc()).limit(limit))
            return [view(c, contributor_name=names.get(c.contributor), task_name=t, use=use_of(c, bases, current))
                    for c, t in rows]

    def task_heads(self, task: str | None = None, base_version: int | None = None) -> list[dict]:
        """Stored heads, newest first (the first per task and base is the one to serve)."""
        query = select(TaskHead, Task.name).join(Task, Task.id == TaskHead.task)
        if task is not None:
            query = query.where(Task.name == task)
        if base_version is not None:
            query = query.where(TaskHead.base_version == base_version)
        with self.transaction() as s:
            return [view(h, task_name=t) for h, t in s.execute(query.order_by(TaskHead.id.desc()))]

    def add_task_head(self, *, task: Task, base_version: int, blob_sha: str, labels: list[str],
                      metrics: dict | None = None, contribution: int | None = None) -> TaskHead:
        """Store a head for `task` on `base_version` (e.g. refitted after a fusion round)."""
        record = TaskHead(task=task.id, base_version=base_version, blob_sha=blob_sha, labels=labels,
                          metrics=metrics or {}, contribution=contribution)
        with self.transaction() as s:
            s.add(record)
        return record
