"""What this CPU can do, in one place, and the precision each part of Potluck runs in on it.

    from potluck.hardware import cpu, plan_precision
    cpu().kind                                         # 'amx', 'avx512-bf16', 'avx512', 'avx2' or 'x86-64'
    plan = plan_precision("bf16", purpose="inference")  # .used: 'bf16' on AMX; 'fp32' on AVX2, with .note why

Potluck runs on Xeons with AVX-512 and AMX and on AMD EPYCs with AVX2 only. The facts come from
three places that can disagree (a hypervisor may hide a flag from torch or show one torch cannot
use): the kernel's flags in /proc/cpuinfo, torch's dispatch level
(`torch.backends.cpu.get_cpu_capability()`) and whether oneDNN runs bf16 at all
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: its bf16 weight packing needs AVX512BW/VL/DQ or
AVX-NE-CONVERT). Inference, fine-tuning, pre-training and the commons' gate all ask `plan_precision`.

What each precision becomes, by measurement (benchmarks/inference.py and benchmarks/finetune.py on
each kind of host; the README shows the tables):

- bf16 runs only where the CPU multiplies bf16 natively (AMX or AVX512-BF16). Elsewhere bf16 is
  emulated: on an AVX2 EPYC fastbert with bf16 weights ran at 0.15x the speed of fp32 and a bf16
  autocast training step at 0.056x (benchmarks/precision.py), so a bf16 request runs fp32 there and
  says so once.
- int8 (potluck.quantize: smoothed, per-row activations, per-channel weights) runs wherever torch has
  its fbgemm kernels (AVX2 and up).
- auto is the fastest precision that kept >= 99.5 % label agreement with fp32 on this kind of CPU
  (benchmarks/inference.py): bf16 where it is native (99.85 % on an AMX Xeon); fp32 elsewhere — int8
  agreed on 99.4 % on an AVX2 EPYC, under the bar, so it runs only when asked for.

Tests fake a CPU with `POTLUCK_CPU=avx2` (or amx, avx512, avx512-bf16, x86-64) or `pretend(...)`: the
decisions follow the fake, so every path's logic runs on every host; a check that needs the real
instructions skips, saying why, where they are missing.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("amx", "avx512-bf16", "avx512", "avx2", "x86-64")
# the flags that decide a path (and that benchmarks record)
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")
# What the fallback saves, measured on an AVX2 EPYC (benchmarks/precision.py; results/avx2/precision.json)
BF16_EMULATED = ("this CPU has no native bf16 (no AMX or AVX512-BF16), and emulated bf16 ran 6.5x slower "
                 "than fp32 for inference and 18x for training on an AVX2 EPYC")

_FAKE_FLAGS = {  # what a pretend CPU of each kind reports
    "amx": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_bf16", "amx_int8"),
    "avx512-bf16": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
    "avx2": ("avx2", "fma"),
    "x86-64": (),
}
_FAKE_CAPABILITY = {"amx": "AVX512", "avx512-bf16": "AVX512", "avx512": "AVX512", "avx2": "AVX2", "x86-64": "DEFAULT"}


@dataclass(frozen=True)
class Cpu:
    """This machine's CPU as Potluck sees it."""

    model: str  # the model name from /proc/cpuinfo
    flags: frozenset[str]  # of FLAGS, those the CPU reports
    cores: int  # logical CPUs this process may use
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): 'AVX512', 'AVX2', 'DEFAULT', ...
    onednn_bf16: bool  # oneDNN runs bf16 (and packs bf16 weights) on this CPU
    pretend: str | None = None  # the kind faked by POTLUCK_CPU / pretend(), None on a real CPU

    @property
    def kind(self) -> str:
        """The host kind benchmarks are filed under: 'amx', 'avx512-bf16', 'avx512', 'avx2' or 'x86-64'."""
        if "amx_bf16" in self.flags:
            return "amx"
        if "avx512_bf16" in self.flags:
            return "avx512-bf16"
        if "avx512f" in self.flags:
            return "avx512"
        if "avx2" in self.flags:
            return "avx2"
        return "x86-64"

    @property
    def native_bf16(self) -> bool:
        """bf16 matmul at hardware speed: AMX or AVX512-BF16, and oneDNN able to use it."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags) and self.onednn_bf16

    @property
    def int8(self) -> bool:
        """torch's dynamic int8 kernels (fbgemm) run here: they need AVX2."""
        return "avx2" in self.flags

    def describe(self) -> str:
        """One line: 'AMD EPYC (avx2; 2 cores; torch AVX2)'."""
        fake = f", pretending to be {self.pretend}" if self.pretend else ""
        return f"{self.model} ({self.kind}; {self.cores} cores; torch {self.torch_capability}{fake})"

    def record(self) -> dict:
        """What a benchmark writes into its results: model, kind, flags, cores, torch version."""
        import torch

        return {"cpu": self.model, "kind": self.kind, "flags": sorted(self.flags), "cores": self.cores,
                "torch_capability": self.torch_capability, "onednn_bf16": self.onednn_bf16,
                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(), **({"pretend": self.pretend} if self.pretend else {})}


@functools.cache
def real_cpu() -> Cpu:
    """This machine's CPU, never faked (for checks that need the real instructions)."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Cpu(model=model, flags=frozenset(flags & set(FLAGS)), cores=cores,
               torch_capability=torch.backends.cpu.get_cpu_capability(), onednn_bf16=onednn_bf16)


_pretending: list[str] = []  # pretend()'s stack, innermost last


def cpu() -> Cpu:
    """This CPU, or the kind named by `pretend()` / the POTLUCK_CPU variable (for tests)."""
    kind = _pretending[-1] if _pretending else os.environ.get("POTLUCK_CPU", "").strip().lower() or None
    real = real_cpu()
    if kind is None:
        return real
    if kind not in _FAKE_FLAGS:
        raise ValueError(f"POTLUCK_CPU={kind!r} is not a CPU kind: use one of {', '.join(KINDS)}")
    flags = frozenset(_FAKE_FLAGS[kind])
    return Cpu(model=real.model, flags=flags, cores=real.cores, torch_capability=_FAKE_CAPABILITY[kind],
               onednn_bf16={"avx512bw", "avx512vl", "avx512dq"} <= flags, pretend=kind)


@contextmanager
def pretend(kind: str):
    """Within the block, `cpu()` describes a CPU of `kind` (one of KINDS): decisions follow it."""
    if kind not in _FAKE_FLAGS:
        raise ValueError(f"{kind!r} is not a CPU kind: use one of {', '.join(KINDS)}")
    _pretending.append(kind)
    try:
        yield
    finally:
        _pretending.pop()


# -- precision -----------------------------------------------------------------------------------

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """The precision that runs (`used`) for the one asked, and why they differ (`note`, else '')."""

    asked: str
    used: str  # 'fp32', 'bf16' or 'int8'
    note: str = field(default="", compare=False)

    @property
    def bf16(self) -> bool:
        return self.used == "bf16"


def plan_precision(asked: str, device: str = "cpu", *, purpose: str = "inference") -> Precision:
    """What `asked` ('auto', 'fp32', 'bf16', 'int8') runs as on `device` for `purpose` ('inference' or
    'training'). A fallback is logged once per process, in one line: what was asked, what runs, why."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        used = asked if asked in ("fp32", "bf16") else "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        plan = Precision(asked, used, "" if asked in (used, "auto") else f"{asked} asked, {used} runs on a GPU")
        return _noted(plan)
    here = cpu()
    if asked == "fp32":
        return Precision(asked, "fp32")
    if asked == "auto":
        return Precision(asked, "bf16" if here.native_bf16 else "fp32")
    if asked == "bf16":
        if here.native_bf16:
            return Precision(asked, "bf16")
        return _noted(Precision(asked, "fp32", f"bf16 asked, running fp32 instead: {BF16_EMULATED} "
                                               f"(this CPU: {here.describe()})"))
    if asked == "int8" and purpose == "inference":
        if here.int8:
            return Precision(asked, "int8")
        return _noted(Precision(asked, "fp32", "int8 asked, running fp32 instead: torch's int8 kernels need AVX2, "
                                               f"which this CPU lacks ({here.describe()})"))
    raise ValueError(f"unknown precision {asked!r} for {purpose}")


_said: set[str] = set()


def _noted(plan: Precision) -> Precision:
    if plan.note:
        say_once(plan.note)
    return plan


def say_once(message: str) -> None:
    """Log `message` as a warning the first time this process says it."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)
