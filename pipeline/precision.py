"""bfloat16 only where the hardware computes it.

A CPU without bfloat16 instructions (on x86: AVX512-BF16 or AMX) has torch emulate bfloat16 matrix products.
On a 2-core AVX2 EPYC a 1024 x 1024 product ran at 0.4 GFLOP/s in bfloat16 against 28.6 in float32, where a
CPU with AVX512-BF16 runs bfloat16 about twice as fast as float32. So a bfloat16 request on such a CPU (model
weights, autocast, ``bf16`` training) runs in float32 instead, said once on stderr: there bfloat16 only costs
time. Other CPU architectures are not measured here and get float32, which is never the slow choice.
"""

from __future__ import annotations

import platform
import sys
from functools import cache

import torch

X86 = ("x86_64", "amd64", "i386", "i686")


@cache
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions torch uses (AVX512-BF16 or AMX on x86)."""
    if platform.machine().lower() not in X86:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@cache
def _say_float32() -> None:
    print(
        "bfloat16 asked for, but this CPU has no bfloat16 instructions (torch would emulate them, some 70 times "
        "slower than float32): running in float32",
        file=sys.stderr,
        flush=True,
    )


def usable_dtype(dtype: str, device: str) -> str:
    """``dtype``, or ``"float32"`` for ``"bfloat16"`` on a CPU without bfloat16 instructions."""
    if dtype == "bfloat16" and device == "cpu" and not cpu_computes_bfloat16():
        _say_float32()
        return "float32"
    return dtype
