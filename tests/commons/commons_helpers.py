"""Plain helpers for the commons' tests (tests/commons/test_commons_*.py import them normally:
`from commons_helpers import make_contribution`); their fixtures are in tests/commons/conftest.py.

`BACKENDS` parametrizes a test on SQLite and on PostgreSQL; `make_commons` makes a fresh commons with a
tiny base, its admin token, and TestClient-backed clients; `live_server` runs `potluck commons serve`
under uvicorn in a subprocess on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from commons_pg import free_port

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Made:
    """A commons made for a test, with its admin token and a way to act as anyone over HTTP (TestClient)."""

    commons: object
    admin: str
    app: object = None
    _clients: list = field(default_factory=list)

    def client(self, token: str | None):
        from fastapi.testclient import TestClient

        from potluck.commons.client import CommonsClient

        http = TestClient(self.app, base_url="http://testserver")
        self._clients.append(http)
        return CommonsClient("http://testserver", token, http=http)

    def invite(self, name: str, role: str = "contributor") -> str:
        return self.client(self.admin).invite(name, role)["token"]

    def close(self) -> None:
        for http in self._clients:
            http.close()
        self.commons.registry.close()


def make_commons(root: Path, base: Path, db_url: str | None, settings=None) -> Made:
    from potluck.commons.api import create_app
    from potluck.commons.service import Commons

    commons, token = Commons.create(root, base=str(base), db_url=db_url)
    if settings is not None:
        commons.settings = settings
    return Made(commons, token, create_app(commons))


def make_contribution(commons, path: Path, *, labels=("calm", "urgent"), version: int = 0,
                      sha: str | None = None, noise: float = 1e-3, head: bool = True,
                      mutate: Callable[[dict], None] | None = None, meta: dict | None = None,
                      n_examples: int = 100, task: str = "acme-urgency", seed: int = 0) -> Path:
    """A weights contribution built from the stored base (plus noise and a head), optionally broken by `mutate`."""
    import torch
    from safetensors.torch import load_file, save_file

    from potluck.commons.formats import contribution_metadata

    base = commons.registry.base(version)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + noise * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
               for k, v in load_file(commons.store.path(base.weights_sha)).items()}
    hidden = tensors["embeddings.word_embeddings.weight"].shape[1]
    if head:
        tensors["head.classifier.weight"] = 0.02 * torch.randn(len(labels), hidden, generator=generator)
        tensors["head.classifier.bias"] = torch.zeros(len(labels))
    if mutate:
        mutate(tensors)
    metadata = contribution_metadata(base_version=version, base_sha256=sha or base.weights_sha, labels=list(labels),
                                     n_examples=n_examples, metrics={"macro_f1": 0.9}, task=task)
    metadata.update(meta or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_csv(path: Path, texts, labels, columns=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(texts, labels, strict=True))
    return path


@contextlib.contextmanager
def live_server(root: Path, db_url: str | None, *extra: str, log: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`potluck commons serve` in a subprocess on a free loopback port; yields (url, process)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "potluck", "commons", "serve", "--root", str(root), "--port", str(port), *extra]
    if db_url:
        command += ["--db", db_url]
    log = log or root.parent / f"server-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the commons server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the commons server did not answer within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
