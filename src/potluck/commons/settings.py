"""Settings of a commons server, as typed dataclasses (the CLI's `serve` options are built from them).

Kept free of heavy imports so that `potluck --help` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WeightLimits:
    """Size limits on a weights contribution, beyond the upload's byte limit."""

    max_tensors: int = field(default=4096, metadata={"help": "tensors in one contribution file"})
    max_header_bytes: int = field(default=8 << 20, metadata={"help": "bytes of a safetensors header"})
    max_head_tensors: int = field(default=32, metadata={"help": "tensors in a task head"})
    max_head_params: int = field(default=16 << 20, metadata={"help": "values in a task head"})


@dataclass
class CommonsSettings:
    """Limits and timings of a commons server."""

    max_weights_mb: int = field(default=2048, metadata={"help": "largest weights upload (MiB)"})
    max_dataset_mb: int = field(default=256, metadata={"help": "largest dataset upload (MiB)"})
    max_json_kb: int = field(default=256, metadata={"help": "largest JSON request body (KiB)"})
    lease_seconds: float = field(default=600.0, metadata={"help": "a job lease lasts this long without a heartbeat"})
    max_attempts: int = field(default=3, metadata={"help": "leases of one job before it is marked failed"})
    eval_fraction: float = field(default=0.2, metadata={"help": "share of a shared dataset held back for evaluation"})
    max_tensors: int = field(default=4096, metadata={"help": "tensors in one weights contribution"})

    def __post_init__(self):
        from potluck.errors import require

        require((min(self.max_weights_mb, self.max_dataset_mb, self.max_json_kb, self.max_attempts,
                     self.max_tensors) >= 1, "size limits and max_attempts must be at least 1"),
                (self.lease_seconds > 0 and 0.05 <= self.eval_fraction <= 0.5,
                 "lease_seconds must be positive and eval_fraction between 0.05 and 0.5"))

    def weight_limits(self) -> WeightLimits:
        return WeightLimits(max_tensors=self.max_tensors)
