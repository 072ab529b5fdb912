"""Lend compute to the commons: lease a job, fine-tune the current base on its data, upload, repeat.

    potluck commons work http://127.0.0.1:8700 [--once] [--max-jobs 5] [--until-empty]

    worker = Worker(CommonsClient(url, token), workdir=Path("~/.cache/potluck-worker"), settings=FinetuneSettings())
    results = worker.run(until_empty=True)

While a job trains, a background thread sends heartbeats (a third of the lease apart). If the lease is
lost (the worker was too slow, or the commons gave the job to someone else) training stops at the next
step and nothing is uploaded. A job that fails here is handed back so another worker can try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

from potluck.commons.client import CommonsClient, CommonsRequestError
from potluck.commons.errors import LeaseLost
from potluck.commons.formats import MARKER, WEIGHTS_FILE, contribution_metadata, write_contribution
from potluck.commons.store import sha256_file
from potluck.finetune import FinetuneSettings

logger = logging.getLogger(__name__)


class Heartbeat:
    """Send heartbeats for a lease from a background thread; `check()` raises LeaseLost once it is lost."""

    def __init__(self, client: CommonsClient, job: int, lease_id: str, interval: float):
        self.client, self.job, self.lease_id, self.interval = client, job, lease_id, max(0.2, interval)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.client.heartbeat(self.job, self.lease_id)
            except CommonsRequestError as err:
                if err.status == 409:
                    self.lost = True
                    logger.warning("lost the lease on job %d: %s", self.job, err.detail)
                    return
                logger.warning("heartbeat for job %d failed: %s", self.job, err)
            except Exception as err:  # the network: keep trying until the lease would expire anyway
                logger.warning("heartbeat for job %d failed: %s", self.job, err)

    def check(self, _event: dict | None = None) -> None:
        if self.lost:
            raise LeaseLost(f"the lease on job {self.job} was lost")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class Worker:
    """Leases jobs from a commons and runs them with `settings` (a job's own settings take precedence)."""

    def __init__(self, client: CommonsClient, workdir: str | os.PathLike, settings: FinetuneSettings | None = None,
                 *, name: str | None = None, poll: float = 30.0):
        self.client = client
        self.workdir = Path(workdir)
        self.settings = settings or FinetuneSettings()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.poll = poll

    def run(self, *, max_jobs: int | None = None, once: bool = False, until_empty: bool = False,
            on_result=None) -> list[dict]:
        """Work until `max_jobs` are done (`once`: one), or the queue is empty (`until_empty`, `once`)."""
        results: list[dict] = []
        limit = 1 if once else max_jobs
        while limit is None or len(results) < limit:
            lease = self.client.lease(self.name)
            if lease is None:
                if once or until_empty:
                    break
                logger.info("no job queued; asking again in %.0f s", self.poll)
                time.sleep(self.poll)
                continue
            result = self.do(lease)
            results.append(result)
            if on_result:
                on_result(result)
        return results

    def do(self, lease: dict) -> dict:
        """Run one leased job: fine-tune its base on its data and upload the weights."""
        job, lease_id = lease["id"], lease["lease_id"]
        outcome = {"job": job, "task": lease["task_name"], "base_version": lease["base_version"]}
        logger.info("job %d: fine-tune base %s on a dataset of task %s", job, lease["base_version"],
                    lease["task_name"])
        scratch = Path(tempfile.mkdtemp(prefix=f"job-{job}-", dir=self._ensure_workdir()))
        try:
            with Heartbeat(self.client, job, lease_id, lease.get("lease_seconds", 600) / 3) as beat:
                base = self.base_folder(lease["base_version"])
                contribution = self.train(lease, base, scratch, beat)
                beat.check()
                record = self.client.submit(job, lease_id, contribution)
            return {**outcome, "status": "done", "contribution": record["id"], "metrics": record["metrics"]}
        except LeaseLost as err:
            return {**outcome, "status": "lease lost", "error": str(err)}
        except CommonsRequestError as err:  # the commons rejected the result, or the lease is gone
            status = "lease lost" if err.status == 409 else "rejected"
            return {**outcome, "status": status, "error": err.detail, "contribution": err.contribution}
        except KeyboardInterrupt:  # stopped by its owner: hand the job back now rather than at lease expiry
            with contextlib.suppress(Exception):
                self.client.fail(job, lease_id, "the worker was stopped")
            raise
        except Exception as err:
            logger.exception("job %d failed", job)
            try:
                self.client.fail(job, lease_id, f"{err.__class__.__name__}: {err}")
            except Exception as report:  # the job comes back when its lease expires anyway
                logger.warning("could not report the failure of job %d: %s", job, report)
            return {**outcome, "status": "failed", "error": f"{err.__class__.__name__}: {err}"}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def train(self, lease: dict, base: Path, scratch: Path, beat: Heartbeat) -> Path:
        """Fine-tune `base` on the job's data; write the contribution file and return its path."""
        from potluck.classifier import TextClassifier
        from potluck.data import read_data

        data_path = self.client.job_data(lease["id"], lease["lease_id"], scratch / "train.jsonl")
        data = read_data(data_path, "text", "label")
        names = {f.name for f in fields(FinetuneSettings)} - {"device"}
        overrides = {k: v for k, v in (lease.get("settings") or {}).items() if k in names}
        settings = FinetuneSettings(**{**asdict(self.settings), **overrides})
        clf = TextClassifier(base, settings=settings).fit(data, on_step=beat.check)
        marker = json.loads((base / MARKER).read_text())
        metrics = {k: float(v) for k, v in clf.metrics_["valid"].items() if isinstance(v, int | float)}
        meta = contribution_metadata(base_version=marker["base_version"], base_sha256=marker["weights_sha256"],
                                     labels=list(clf.classes_), n_examples=clf.data_["n_train"],
                                     metrics=metrics, task=lease["task_name"])
        path = scratch / "contribution.safetensors"
        base_names = set(self.client.base(marker["base_version"])["spec"])
        write_contribution(clf.predictor_.model.state_dict(), base_names, meta, path)
        return path

    def base_folder(self, version: int) -> Path:
        """Base `version`, pulled once and kept in the work folder (re-pulled if its weights changed)."""
        folder = self._ensure_workdir() / "bases" / f"v{version}"
        marker = folder / MARKER
        if marker.is_file():
            known = json.loads(marker.read_text())
            if known.get("base_version") == version and sha256_file(folder / WEIGHTS_FILE) == known.get("weights_sha256"):
                return folder
        self.client.pull(folder, version)
        return folder

    def _ensure_workdir(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir
