"""Receiving contributions: stream to the blob store, check, then commit the blob and the record.

An upload is streamed into a temp file of the blob store and hashed as it arrives, within the size
limit. Only when it is complete, matches the sha256 the client declared, and passes every check is it
renamed to its content address; only then is its record committed. A server killed at any point before
leaves a temp file (swept at the next start) and no record; a rejected upload leaves its rejection on
record and none of its bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from functools import partial

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from potluck.commons.checks import check_dataset, check_weights, to_jsonl
from potluck.commons.errors import LeaseLost, Rejected
from potluck.commons.formats import HEAD_PREFIX
from potluck.commons.models import Contributor, Job, Task, view
from potluck.commons.service import Commons
from potluck.commons.store import BlobCorrupted, BlobTooLarge, PendingBlob

logger = logging.getLogger(__name__)


async def receive(request: Request, pending: PendingBlob, expected_sha: str | None) -> str:
    """Stream the request body into `pending`; return its sha256 (Rejected on size or hash mismatch)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and pending.max_bytes is not None and int(declared) > pending.max_bytes:
        raise Rejected(f"the upload is {int(declared)} bytes, over the limit of {pending.max_bytes}", status=413)
    try:
        async for chunk in request.stream():
            pending.write(chunk)
    except BlobTooLarge as err:
        raise Rejected(f"the upload is {err}", status=413) from None
    sha = await run_in_threadpool(pending.finish)
    if pending.size == 0:
        raise Rejected("the upload is empty")
    if expected_sha is not None and expected_sha != sha:
        raise Rejected(f"the upload was corrupted in transit: its bytes hash to {sha[:16]}…, not the "
                       f"declared {expected_sha[:16]}…", status=400)
    return sha


def store_head(commons: Commons, blob_sha: str, head: list[str], labels: list[str]) -> str:
    """Copy the head tensors of an accepted contribution into their own small blob (names without 'head.')."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(commons.store.path(blob_sha)), framework="pt") as f:
        tensors = {name[len(HEAD_PREFIX):]: f.get_tensor(name) for name in head}
    return commons.store.put_bytes(save(tensors, metadata={"format": "potluck.head/1", "labels": json.dumps(labels)}))


def accept_weights_file(commons: Commons, pending: PendingBlob, who: Contributor, task: Task,
                        job: Job | None = None) -> dict:
    """Check a received weights file, move it into the store, record it (blocking; Rejected if it fails)."""
    checked = check_weights(pending.path, task=task, base_of=commons.registry.base, store=commons.store,
                            limits=commons.settings.weight_limits())
    blob_sha = pending.commit()
    head_sha = store_head(commons, blob_sha, checked.head, checked.labels)
    record = commons.registry.accept_weights(
        actor=who, task=task, base_version=checked.base_version, n_examples=checked.n_examples,
        metrics=checked.metrics, blob_sha=blob_sha, head_sha=head_sha, labels=checked.labels,
        details=checked.details, job=job.id if job else None, lease_id=job.lease_id if job else None)
    logger.info("accepted weights from %s for %s on base %d (relative change %.4f)", who.name, task.name,
                checked.base_version, checked.details["relative_change"])
    return view(record)


async def accept_weights(commons: Commons, request: Request, who: Contributor, task: Task, *,
                         expected_sha: str | None, job: Job | None = None) -> dict:
    """Receive, check and record a weights contribution (pushed, or the result of a leased job)."""
    try:
        with commons.store.begin(commons.settings.max_weights_mb << 20) as pending:
            await receive(request, pending, expected_sha)
            return await run_in_threadpool(accept_weights_file, commons, pending, who, task, job)
    except (Rejected, BlobCorrupted) as err:
        return await run_in_threadpool(_reject, commons, who, task, err, job)


def _reject(commons: Commons, who: Contributor, task: Task, err: Exception, job: Job | None):
    """Record the rejection (and give a job's lease back), then raise it for the API to answer."""
    reason = getattr(err, "reason", str(err))
    record = commons.registry.reject(kind="weights", actor=who, task=task, reason=reason,
                                     base_version=getattr(err, "base_version", None),
                                     job=job.id if job else None)
    if job is not None:
        with contextlib.suppress(LeaseLost):  # expired meanwhile: it is back in the queue anyway
            commons.registry.release_job(job.id, job.lease_id, who, error=f"result rejected: {reason}",
                                         max_attempts=commons.settings.max_attempts)
    raise RecordedRejection(reason, getattr(err, "status", 422), record.id)


class RecordedRejection(Rejected):
    """A rejection already on record: the API answers with its reason and the contribution id."""

    def __init__(self, reason: str, status: int, contribution: int):
        super().__init__(reason, status=status)
        self.contribution = contribution


async def accept_dataset(commons: Commons, request: Request, who: Contributor, task: Task, *,
                         eval_only: bool, eval_fraction: float | None, expected_sha: str | None) -> dict:
    """Receive a dataset (JSONL of text and label), check and split it, store both parts, queue a job."""
    settings = commons.settings
    fraction = settings.eval_fraction if eval_fraction is None else eval_fraction
    try:
        with commons.store.begin(settings.max_dataset_mb << 20, suffix=".jsonl") as pending:
            await receive(request, pending, expected_sha)
            train, held, details = await run_in_threadpool(check_dataset, pending.path, task=task,
                                                           eval_fraction=fraction, eval_only=eval_only)
    except Rejected as err:
        record = await run_in_threadpool(partial(commons.registry.reject, kind="dataset", actor=who, task=task,
                                                 reason=err.reason))
        raise RecordedRejection(err.reason, err.status, record.id) from None
    train_sha = await run_in_threadpool(commons.store.put_bytes, to_jsonl(train)) if train is not None else None
    eval_sha = await run_in_threadpool(commons.store.put_bytes, to_jsonl(held))
    record, job = await run_in_threadpool(
        lambda: commons.registry.accept_dataset(actor=who, task=task, n_train=len(train) if train else 0,
                                                n_eval=len(held), blob_sha=train_sha, eval_sha=eval_sha,
                                                eval_only=eval_only, details=details))
    return {"contribution": view(record), "job": view(job) if job else None}
