"""How the server batches and what it accepts: one typed dataclass, turned into `potluck serve` options.

Kept free of FastAPI imports so the CLI can build its options without paying for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from potluck.errors import require


@dataclass
class ServeSettings:
    """Limits and batching of the HTTP service (host, port and keys are CLI arguments)."""

    precision: str = field(default="auto", metadata={"help": "'auto' (the fastest that keeps 99.5 % agreement with fp32 on this CPU: bf16 where it is native, else fp32), 'fp32', 'bf16' or 'int8'"})
    backend: str = field(default="torch", metadata={"help": "'torch' (potluck.fastbert) or 'onnx' (the folder's onnx/ export on ONNX Runtime; see `potluck export`)"})
    max_texts: int = field(default=64, metadata={"help": "most texts in one request (413 beyond)"})
    max_chars: int = field(default=20_000, metadata={"help": "most characters in one text (413 beyond)"})
    max_body_bytes: int = field(default=2_000_000, metadata={"help": "largest request body in bytes (413 beyond)"})
    auto_truncate: bool = field(default=True, metadata={"help": "cut texts longer than the model's max_length when a request does not say `truncate`"})
    processes: bool = field(default=True, metadata={"help": "run the models in worker processes, one per core, so that a model never waits for the HTTP event loop (CPython's GIL); --no-processes runs them on threads of the server process"})
    max_wait_ms: float = field(default=3.0, metadata={"help": "how long a batch below its fair share of the texts in the server (see potluck.serving.batcher) waits for more to arrive"})
    max_batch_texts: int = field(default=64, metadata={"help": "most texts gathered into one model run"})
    max_batch_tokens: int = field(default=8192, metadata={"help": "most padded tokens gathered into one model run"})
    graceful_timeout: float = field(default=30.0, metadata={"help": "seconds a shutdown waits for requests in flight"})

    def __post_init__(self):
        require(
            (self.precision in ("auto", "fp32", "bf16", "int8"), "precision must be 'auto', 'fp32', 'bf16' or 'int8'"),
            (self.backend in ("torch", "onnx"), "backend must be 'torch' or 'onnx'"),
            (self.max_texts >= 1, "max_texts must be at least 1"),
            (self.max_chars >= 1, "max_chars must be at least 1"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be at least 1024"),
            (0 <= self.max_wait_ms <= 1000, "max_wait_ms must be between 0 and 1000"),
            (self.max_batch_texts >= 1, "max_batch_texts must be at least 1"),
            (self.max_batch_tokens >= 128, "max_batch_tokens must be at least 128"),
            (self.graceful_timeout >= 0, "graceful_timeout must not be negative"),
        )
