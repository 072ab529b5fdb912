"""The commons' records, as SQLAlchemy 2 tables (the same schema on SQLite and PostgreSQL).

    contributors   who may do what; tokens stored as sha256 only
    base_versions  the shared encoder, version by version: parent, blobs, how it was made, lineage
    tasks          a named classification task, its labels and its owner
    contributions  weights or a dataset, from whom, for which task, on which base; accepted or rejected
    task_heads     a task's classification head on a given base version (the commons serves tasks with them)
    jobs           "fine-tune the current base on this dataset", leased to workers with a heartbeat

Fusion rounds (the next issue) add base versions with `parent`, `method` and `lineage` (the fused
contributions, the gate's scores), set `status` ('candidate', 'promoted', 'rejected') and mark the
contributions they fuse with `fused_into`. Only a promoted candidate uses them up: a rejected one gives them
back (`fused_into` cleared; one left pointing at a rejected base counts as free too), so no column records
"used" and no migration is needed; `overview.use_of` derives it for the API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone; we store UTC and say so)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Meta(Base):
    """Key-value facts about this commons (schema version, when it was made)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Contributor(Base):
    __tablename__ = "contributors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reader | contributor | admin
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    invited_by: Mapped[int | None] = mapped_column(ForeignKey("contributors.id"))
    active: Mapped[bool] = mapped_column(default=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class BaseVersion(Base):
    __tablename__ = "base_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(ForeignKey("base_versions.version"))
    status: Mapped[str] = mapped_column(String(16), default="promoted")  # candidate | promoted | rejected
    method: Mapped[str] = mapped_column(String(64))  # 'init from minilm', 'fusion:ties', ...
    manifest_sha: Mapped[str] = mapped_column(String(64))  # the bundle: file name -> blob sha256
    weights_sha: Mapped[str] = mapped_column(String(64))  # the encoder body's model.safetensors
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # tensor name -> [dtype, shape]
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)  # source, fused contributions, gate scores
    created_by: Mapped[int | None] = mapped_column(ForeignKey("contributors.id"))
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[list[Any]] = mapped_column(default=list)
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[int] = mapped_column(ForeignKey("contributors.id"))
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Contribution(Base):
    __tablename__ = "contributions"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # weights | dataset
    contributor: Mapped[int] = mapped_column(ForeignKey("contributors.id"))
    task: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    base_version: Mapped[int | None] = mapped_column(Integer)  # the base it was fine-tuned from (as declared)
    n_examples: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # as reported by the contributor
    status: Mapped[str] = mapped_column(String(16))  # accepted | rejected
    reason: Mapped[str] = mapped_column(Text, default="")  # why it was rejected
    blob_sha: Mapped[str | None] = mapped_column(String(64))  # weights: body + head; dataset: train part
    head_sha: Mapped[str | None] = mapped_column(String(64))  # weights: the head alone
    eval_sha: Mapped[str | None] = mapped_column(String(64))  # dataset: the held-back evaluation part
    n_eval: Mapped[int] = mapped_column(default=0)
    eval_only: Mapped[bool] = mapped_column(default=False)
    job: Mapped[int | None] = mapped_column(Integer)  # jobs.id that produced these weights (no FK: no cycle)
    fused_into: Mapped[int | None] = mapped_column(ForeignKey("base_versions.version"))  # used iff that base is promoted
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # label counts, weight deltas, warnings
    created: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_contributions_status", "kind", "status", "base_version"),)


class TaskHead(Base):
    __tablename__ = "task_heads"
    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    base_version: Mapped[int] = mapped_column(ForeignKey("base_versions.version"))
    blob_sha: Mapped[str] = mapped_column(String(64))  # safetensors of the head tensors
    labels: Mapped[list[Any]] = mapped_column(default=list)  # the order of the head's output rows
    contribution: Mapped[int | None] = mapped_column(ForeignKey("contributions.id"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset: Mapped[int] = mapped_column(ForeignKey("contributions.id"))
    task: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | leased | done | failed
    base_version: Mapped[int | None] = mapped_column(Integer)  # the base handed out with the lease
    lease_id: Mapped[str | None] = mapped_column(String(64))  # changes with every lease
    leased_by: Mapped[int | None] = mapped_column(ForeignKey("contributors.id"))
    worker: Mapped[str] = mapped_column(String(128), default="")
    lease_expires: Mapped[datetime | None] = mapped_column()
    heartbeat: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(default=0)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # FinetuneSettings overrides for workers
    result: Mapped[int | None] = mapped_column(Integer)  # contributions.id of the weights it produced
    error: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(default=utcnow)
    finished: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index("ix_jobs_status", "status", "id"),)


def view(record, **extra) -> dict[str, Any]:
    """A record's columns as a JSON-ready dict (datetimes in ISO 8601), plus `extra`."""
    out = {}
    for column in record.__table__.columns:
        if column.key in ("token_hash", "lease_id"):  # secrets and capabilities stay private
            continue
        value = getattr(record, column.key)
        out[column.key] = value.isoformat(timespec="seconds") if isinstance(value, datetime) else value
    out.update(extra)
    return out
