"""bfloat16 only where the CPU computes it: a bfloat16 request elsewhere runs in float32, said once."""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import pytest
import torch

from pipeline import precision
from pipeline.llm import BackendSpec
from pipeline.llm.local import LocalBackend
from pipeline.precision import X86, _say_float32, cpu_computes_bfloat16, usable_dtype
from trainers import StableAlignmentConfig
from trainers.preference import Scorer

NATIVE = cpu_computes_bfloat16()
EXPECTED = "bfloat16" if NATIVE else "float32"


@pytest.fixture(autouse=True)
def _say_again() -> None:
    """Each test sees the notice of its own first fallback."""
    _say_float32.cache_clear()


@pytest.mark.skipif(
    platform.machine().lower() not in X86 or not Path("/proc/cpuinfo").is_file(), reason="x86 Linux"
)
def test_the_cpu_check_agrees_with_the_kernels_cpu_flags() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert bool({"avx512_bf16", "amx_bf16"} & flags) == NATIVE


def test_only_bfloat16_on_a_cpu_changes_and_the_change_is_said_once(capsys) -> None:
    assert [usable_dtype(d, "cpu") for d in ("float32", "float16", "auto")] == ["float32", "float16", "auto"]
    assert usable_dtype("bfloat16", "cuda") == "bfloat16"
    assert [usable_dtype("bfloat16", "cpu") for _ in range(2)] == [EXPECTED] * 2
    notice = capsys.readouterr().err
    assert notice.count("no bfloat16 instructions") == (0 if NATIVE else 1), notice


def test_a_local_backend_asked_for_bfloat16_loads_the_usable_dtype(tiny_model_dir: Path) -> None:
    backend = LocalBackend(tiny_model_dir, BackendSpec(kind="local", dtype="bfloat16", max_tokens=2))
    try:
        assert backend.model.dtype == getattr(torch, EXPECTED)
        # The cache identity names the dtype that ran, so float32 answers never replay as bfloat16 ones
        assert f"|{EXPECTED}|" in backend.identity
    finally:
        asyncio.run(backend.aclose())


def test_a_bfloat16_request_run_in_float32_is_cached_as_a_float32_one(
    tiny_model_dir: Path, monkeypatch
) -> None:
    """Where the CPU lacks bfloat16, a bfloat16 backend is the float32 one to the response cache, so make run's
    bfloat16 evaluation replays the shipped float32 evaluation there."""
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: False)
    asked = {
        d: LocalBackend(tiny_model_dir, BackendSpec(kind="local", dtype=d, max_tokens=2))
        for d in ("bfloat16", "float32")
    }
    try:
        assert asked["bfloat16"].identity == asked["float32"].identity
        # The judge's calibration is looked up by the scoring model: the float32 one scores
        assert asked["bfloat16"].scoring_model == asked["float32"].scoring_model
    finally:
        for backend in asked.values():
            asyncio.run(backend.aclose())


def test_bfloat16_autocast_and_training_follow_the_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert Scorer.load(tiny_model_dir, autocast="bfloat16").autocast == (EXPECTED if NATIVE else None)
    assert Scorer.load(tiny_model_dir).autocast is None
    config = StableAlignmentConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none")
    assert config.bf16 is NATIVE
    assert StableAlignmentConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is False
