"""Helpers for the inference and serving tests: a tiny fine-tuned model folder (built once per test
session) and a real `potluck serve` process on a free loopback port. A plain module: `from serving_helpers
import Server, tiny_model`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import toy_texts

FAST = dict(epochs=3, batch_size=8, learning_rate=3e-3, precision="fp32", warmup_ratio=0.0,
            train_word_embeddings=True)  # a random encoder has nothing to transfer: its word embeddings must learn too


def tiny_model(tmp_path_factory, tiny_encoder, name: str = "urgency") -> Path:
    """A tiny classifier (calm / urgent) saved as a model folder named `name`; trained once per session."""
    from potluck import TextClassifier

    root = tmp_path_factory.getbasetemp() / "serving-models"
    source = root / "source"
    if not (source / "config.json").is_file():
        texts, labels = toy_texts(160)
        TextClassifier(base=tiny_encoder, **FAST).fit(texts, labels).save(source)
    folder = root / name
    if not folder.exists():
        shutil.copytree(source, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m potluck serve ...` on 127.0.0.1:<free port>; waits until /ready answers 200."""

    def __init__(self, *args: str, startup_timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "potluck", "serve", *map(str, args), "--host", "127.0.0.1",
             "--port", str(self.port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"potluck serve exited with {self.process.returncode}: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"potluck serve was not ready after {startup_timeout} s")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.process.stdout.read() if self.process.stdout else ""

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
