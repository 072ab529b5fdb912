"""potluck.hardware: one place decides what each precision runs as on this CPU, says why once, and
every path's logic runs on every host by pretending to be the other kind of CPU."""

import logging

import pytest

from potluck import hardware
from potluck.hardware import cpu, plan_precision, pretend, real_cpu


def test_the_real_cpu_is_described_and_recorded():
    here = real_cpu()
    assert here.kind in hardware.KINDS and here.cores >= 1 and here.model
    record = here.record()
    assert {"cpu", "kind", "flags", "cores", "torch", "torch_capability"} <= set(record)
    assert here.kind in here.describe()


@pytest.mark.parametrize("kind,native,int8", [("amx", True, True), ("avx512-bf16", True, True),
                                               ("avx512", False, True), ("avx2", False, True),
                                               ("x86-64", False, False)])
def test_pretend_cpus_have_the_kinds_capabilities(kind, native, int8):
    with pretend(kind):
        assert cpu().kind == kind and cpu().pretend == kind
        assert cpu().native_bf16 is native and cpu().int8 is int8
    assert cpu() == real_cpu()


def test_the_environment_variable_pretends_too(monkeypatch):
    monkeypatch.setenv("POTLUCK_CPU", "avx2")
    assert cpu().kind == "avx2"
    monkeypatch.setenv("POTLUCK_CPU", "pentium")
    with pytest.raises(ValueError, match="not a CPU kind"):
        cpu()


def test_amx_runs_what_was_asked():
    with pretend("amx"):
        for purpose in ("inference", "training"):
            assert plan_precision("auto", purpose=purpose).used == "bf16"
            assert plan_precision("bf16", purpose=purpose) == hardware.Precision("bf16", "bf16")
            assert plan_precision("fp32", purpose=purpose).used == "fp32"
        assert plan_precision("int8").used == "int8"


@pytest.mark.parametrize("kind", ["avx2", "avx512"])
def test_without_native_bf16_bf16_falls_back_to_fp32_and_says_why_once(kind, caplog):
    hardware._said.clear()
    with pretend(kind), caplog.at_level(logging.WARNING, logger="potluck.hardware"):
        for purpose in ("inference", "training"):
            assert plan_precision("auto", purpose=purpose).used == "fp32"
            plan = plan_precision("bf16", purpose=purpose)
            assert plan.used == "fp32" and not plan.bf16
            assert plan.note.startswith("bf16 asked, running fp32 instead:") and kind in plan.note
        assert plan_precision("int8").used == "int8"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "\n" not in notes[0], notes  # said once, in one line


def test_int8_needs_avx2():
    with pretend("x86-64"):
        plan = plan_precision("int8")
    assert plan.used == "fp32" and "int8 kernels need AVX2" in plan.note


def test_a_training_precision_is_never_int8():
    with pytest.raises(ValueError, match="unknown precision"):
        plan_precision("int8", purpose="training")
