"""Several processes, one training loop: PyTorch distributed data parallel, launched by torchrun.

    potluck finetune --data train.csv --out models/x --nproc 2       # spawns torchrun on this machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29500 -m potluck finetune ... --out models/x

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `context()` reads them. gloo on CPU, NCCL on CUDA.
Every rank builds the same global batches (same seed, same lengths) and takes its own slice of each,
so a run on N processes sees the same batches as one process with the same --batch-size (the
effective batch), and only rank 0 logs, shows progress and writes checkpoints and the model folder.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from potluck.errors import UserError

logger = logging.getLogger(__name__)

ERROR_DIR = "POTLUCK_ERROR_DIR"  # where a failing rank leaves its one-line error for the launcher


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def context() -> Context:
    """The distributed context from torchrun's environment (a single process when there is none)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Context(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def init(ctx: Context, device: torch.device) -> None:
    """Join the process group once (gloo on CPU, NCCL on CUDA); a no-op in a single process."""
    if not ctx.enabled or dist.is_initialized():
        return
    die_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    logger.info("rank %d of %d joined (%s)", ctx.rank, ctx.world_size, dist.get_backend())


def die_with_parent() -> None:
    """Linux: end this process when its parent dies, e.g. killed with -9: a rank when torchrun's agent
    dies (otherwise the ranks run on as orphans, writing checkpoints, until a write to the dead
    parent's pipe ends them), a model process of `potluck serve` when the server dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) is not available")
        return
    if os.getppid() == 1:  # the parent died before the call: stop now
        os.kill(os.getpid(), signal.SIGKILL)


def device_for(ctx: Context, device: torch.device) -> torch.device:
    """Each rank on a GPU gets its own (LOCAL_RANK); CPU ranks share the CPU."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" else device


def shard(batch, ctx: Context):
    """This rank's share of a global batch, a list or a tensor of rows (every rank computes the same
    global batches)."""
    return batch[ctx.rank::ctx.world_size]


def agree(ctx: Context, value: float) -> float:
    """Rank 0's `value` on every rank (decisions from a clock, such as --max-time, must not differ)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def report_error(message: str) -> None:
    """Leave this rank's one-line error where the launcher (`launch`) will find it."""
    folder = os.environ.get(ERROR_DIR)
    if folder:
        Path(folder, f"rank-{os.environ.get('RANK', '0')}.txt").write_text(message, encoding="utf-8")


# torchrun's own log lines (glog style: "W1126 15:20:01.123 ...") and banners are for developers.
_TORCHRUN_LOG = re.compile(r"^([WEI]\d{4} \d|\*{10,})")


def launch(nproc: int, argv: list[str]) -> None:
    """Run `potluck ARGV` on `nproc` local processes under torchrun.

    Rank 0's output is passed through. If a rank fails, torchrun stops the others (no hang) and this
    raises a UserError with that rank's own one-line message instead of torchrun's failure report.
    """
    with tempfile.TemporaryDirectory(prefix="potluck-ranks-") as errors:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "-m", "potluck", *argv]
        proc = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR: errors}, stderr=subprocess.PIPE, text=True)
        torchrun_failed = False
        for line in proc.stderr:
            if _TORCHRUN_LOG.match(line):
                torchrun_failed = torchrun_failed or line.startswith("E")
            elif not torchrun_failed:  # after torchrun's first error line comes its traceback: not ours
                sys.stderr.write(line)
        code = proc.wait()
        if code != 0:
            reports = sorted(Path(errors).glob("rank-*.txt"))
            if reports:
                rank = reports[0].stem.split("-")[1]
                raise UserError(f"rank {rank} failed: {reports[0].read_text(encoding='utf-8').strip()}")
            raise UserError(f"a training process failed (torchrun exit code {code})",
                            hint="its error is above; run without --nproc to debug it in one process")
