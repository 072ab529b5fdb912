"""The commons client: what `potluck commons invite | pull | push | share | work | status` call.

    client = CommonsClient("http://127.0.0.1:8700", token=os.environ["POTLUCK_TOKEN"])
    client.pull("base/")                                      # the current base, as a folder finetune takes
    client.push("models/acme-urgency", task="acme-urgency")   # encoder body + head; the data stays home
    client.share("tickets.csv", task="helpdesk-topic")        # a dataset the commons may train on

Uploads are streamed from disk with their sha256 declared, downloads are streamed to a temp file, checked
against the sha256 the commons lists, then renamed into place. A refusal from the service becomes a
one-line `UserError` with the service's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from potluck.commons.formats import (
    contribution_metadata,
    mark_pulled,
    model_provenance,
    safe_file_name,
    write_contribution,
)
from potluck.commons.store import CHUNK, sha256_file
from potluck.errors import UserError
from potluck.fileio import atomic_folder, check_output

logger = logging.getLogger(__name__)

TOKEN_ENV = "POTLUCK_TOKEN"
HINTS = {401: "pass --token or set POTLUCK_TOKEN to a token from the commons' admin",
         403: "ask the commons' admin for the right role, or use a task of your own",
         404: "check the name or number", 409: "look at `potluck commons status`",
         413: "the upload is over the commons' limits", 422: "fix what it says and try again"}


class CommonsRequestError(UserError):
    """The service answered with an error; `status` is its HTTP status, `detail` its reason."""

    def __init__(self, what: str, status: int, detail: str, contribution: int | None = None):
        super().__init__(f"{what}: the commons answered {status}: {detail}", hint=HINTS.get(status))
        self.status, self.detail, self.contribution = status, detail, contribution


def warn_unpromoted(info: dict) -> None:
    """Say so (a warning) when a base is not the commons' promoted base; mark `info` with `rejected`."""
    status = info.get("status", "promoted")
    info.setdefault("rejected", status == "rejected")
    if status != "promoted":
        info.setdefault("warning", f"base version {info['version']} is {status}, not promoted: it is not the "
                                   "commons' base")
        logger.warning("%s", info["warning"])


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class CommonsClient:
    """A client of one commons at `url`, acting with `token` (or $POTLUCK_TOKEN)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0,
                 http: httpx.Client | None = None):
        self.url = url.rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http or httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0))
        self.http.headers.update(headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CommonsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise UserError(f"cannot reach the commons at {self.url} ({err.__class__.__name__})",
                            hint="check the URL, and that `potluck commons serve` runs there") from None
        if response.status_code >= 400:
            self._raise(method, path, response)
        return response

    def _raise(self, method: str, path: str, response: httpx.Response):
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:300] or response.reason_phrase}
        detail = body.get("detail")
        if isinstance(detail, list):  # pydantic validation errors
            detail = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)
        raise CommonsRequestError(f"{method} {path}", response.status_code, str(detail), body.get("contribution"))

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def upload(self, path: str, file: Path, params: dict | None = None) -> dict:
        """POST a file as the body, streamed, with its sha256 declared so the commons can check it."""
        params = dict(params or {}, sha256=sha256_file(file))
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(file.stat().st_size)}
        return self.request("POST", path, params=params, content=_chunks(file), headers=headers).json()

    def download(self, path: str, dest: Path, expected_sha: str | None = None, params: dict | None = None) -> Path:
        """GET into `dest` via a temp file; the bytes must hash to `expected_sha` (or the served X-Content-SHA256)."""
        import hashlib

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f, self.http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise("GET", path, response)
                expected_sha = expected_sha or response.headers.get("x-content-sha256")
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
            if expected_sha and digest.hexdigest() != expected_sha:
                raise UserError(f"{path} arrived corrupted (sha256 {digest.hexdigest()[:16]}…, expected "
                                f"{expected_sha[:16]}…)", hint="try again")
            os.replace(tmp, dest)
        except httpx.TransportError as err:
            raise UserError(f"cannot reach the commons at {self.url} ({err.__class__.__name__})",
                            hint="check the URL, and that `potluck commons serve` runs there") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    # -- what users do --------------------------------------------------------------------------

    def invite(self, name: str, role: str = "contributor") -> dict:
        return self.request("POST", "/v1/contributors", json={"name": name, "role": role}).json()

    def status(self) -> dict:
        return self.get("/v1/status")

    def base(self, version: int | None = None) -> dict:
        return self.get(f"/v1/bases/{'current' if version is None else version}")

    def pull(self, out: str | os.PathLike, version: int | None = None, *, overwrite: bool = False) -> dict:
        """Write base `version` (default: the current one) as a Hugging Face folder at `out` (an existing
        non-empty folder only with `overwrite`). A base the gate rejected (or has not judged) is written too,
        with a warning, and `info["rejected"]` and `info["warning"]` say so."""
        check_output(out, overwrite=overwrite)
        info = self.base(version)
        warn_unpromoted(info)
        with atomic_folder(out, overwrite=overwrite) as tmp:
            for name, f in info["files"].items():
                if not safe_file_name(name):  # never trust a file name from elsewhere
                    raise UserError(f"the commons lists an unsafe file name {name!r}", hint="tell its admin")
                self.download(f"/v1/bases/{info['version']}/files/{name}", tmp / name, f["sha256"])
            mark_pulled(tmp, {"url": self.url, "base_version": info["version"], "weights_sha256": info["weights_sha"],
                              "manifest_sha256": info["manifest_sha"]})
        return info

    def ensure_task(self, task: str, labels: list[str]) -> dict:
        """The task, created (owned by you) with `labels` if it does not exist yet.

        A task of yours with nothing accepted yet (one made for a push that was rejected, say) takes `labels`
        when it lacks some of them, so a fixed model can go where the rejected one went.
        """
        try:
            record = self.get(f"/v1/tasks/{task}")
        except CommonsRequestError as err:
            if err.status != 404:
                raise
            return self.request("PUT", f"/v1/tasks/{task}", json={"labels": labels}).json()
        if set(labels) <= set(record["labels"]):
            return record
        with contextlib.suppress(CommonsRequestError):  # not yours, or its labels are in use: the upload says why
            return self.request("PUT", f"/v1/tasks/{task}", json={"labels": labels}).json()
        return record

    def push(self, model: str | os.PathLike, task: str, *, base_version: int | None = None,
             n_examples: int | None = None) -> dict:
        """Upload a fine-tuned model's encoder body and head (never its data) as a weights contribution."""
        from potluck.folder import load_tensors

        folder = Path(model)
        info = model_provenance(folder)
        tensors = load_tensors(folder)  # safetensors that parse, every value finite: checked before any request
        declared = info["commons"] or {}
        version = base_version if base_version is not None else declared.get("base_version")
        if version is None:
            raise UserError(f"{folder} does not say which commons base it was fine-tuned from",
                            hint="fine-tune from a folder made by `potluck commons pull`, or pass --base-version")
        if declared.get("url") and declared["url"] != self.url:
            logger.warning("%s was fine-tuned from a base pulled from %s, not %s", folder, declared["url"], self.url)
        base = self.base(version)
        base_sha = declared["weights_sha256"] if declared.get("base_version") == version else base["weights_sha"]
        n_examples = n_examples or info["n_examples"]
        if not n_examples:
            raise UserError(f"{folder}/potluck.json does not say how many examples trained it",
                            hint="pass --examples N")
        meta = contribution_metadata(base_version=version, base_sha256=base_sha, labels=info["labels"],
                                     n_examples=n_examples, metrics=info["metrics"], task=task)
        with tempfile.TemporaryDirectory(prefix="potluck-push-") as tmp:
            path = Path(tmp) / "contribution.safetensors"
            write_contribution(tensors, set(base["spec"]), meta, path)
            self.ensure_task(task, info["labels"])  # only now: a push refused at home creates no task
            return self.upload(f"/v1/tasks/{task}/weights", path)

    def share(self, data: str | os.PathLike, task: str, *, text_column: str = "text", label_column: str = "label",
              eval_only: bool = False, eval_fraction: float | None = None) -> dict:
        """Check a labelled file like `potluck finetune` does, then send it (as JSONL) to the commons."""
        from potluck.commons.checks import to_jsonl
        from potluck.data import check_training_data, read_data

        dataset = read_data(data, text_column, label_column)
        check_training_data(dataset)
        self.ensure_task(task, sorted(set(dataset.labels)))
        params = {"eval_only": str(eval_only).lower()}
        if eval_fraction is not None:
            params["eval_fraction"] = eval_fraction
        with tempfile.TemporaryDirectory(prefix="potluck-share-") as tmp:
            path = Path(tmp) / "dataset.jsonl"
            path.write_bytes(to_jsonl(dataset))
            return self.upload(f"/v1/tasks/{task}/datasets", path, params)

    def round(self, **settings) -> dict:
        """Admin: run a fusion round (RoundSettings fields); it runs in the request (give the client a long timeout)."""
        return self.request("POST", "/v1/rounds", json=settings).json()

    def predict(self, task: str, inputs: str | list[str]) -> list:
        """A task's labels with probabilities, highest first, as `potluck serve` answers."""
        return self.request("POST", f"/v1/tasks/{task}/predict", json={"inputs": inputs}).json()

    # -- what workers do ------------------------------------------------------------------------

    def lease(self, worker: str) -> dict | None:
        response = self.request("POST", "/v1/jobs/lease", json={"worker": worker})
        return None if response.status_code == 204 else response.json()

    def heartbeat(self, job: int, lease_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job}/heartbeat", json={"lease_id": lease_id}).json()

    def job_data(self, job: int, lease_id: str, dest: Path) -> Path:
        return self.download(f"/v1/jobs/{job}/data", dest, params={"lease_id": lease_id})

    def submit(self, job: int, lease_id: str, contribution: Path) -> dict:
        return self.upload(f"/v1/jobs/{job}/result", contribution, {"lease_id": lease_id})

    def fail(self, job: int, lease_id: str, error: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job}/fail", json={"lease_id": lease_id, "error": error[:4000]}).json()
