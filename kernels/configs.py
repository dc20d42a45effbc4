"""Autotune spaces of the Triton kernels, as data.

Each entry lists the device families it is meant for:
  "sm90"  Hopper (H100/H200: 228 KB shared memory per SM, wgmma)
  "sm80"  A100 (164 KB shared memory)
  "sm8x"  GeForce/workstation Ampere and Ada, sm_86/sm_89 (~100 KB shared memory: smaller
          tiles, fewer pipeline stages)
  "interp" the CPU interpreter (TRITON_INTERPRET=1): one config, tiles as large as tests allow
The spaces are kept to a few entries each so that first-call autotuning stays in seconds.
"""

from __future__ import annotations

import os

import torch

# attention: BLOCK_M queries x BLOCK_N keys per step. sm90 entries measured on an H200 (bench_kernels
# --sweep, 2026-11-21): 128x64 w8 s3 fastest (no spills); 128x128 w8 s2 within 2%; 128x64 w4 spills;
# 128x128 with 3 stages and 64x128 need more than the 227 KB of shared memory.
ATTENTION = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, archs=("sm90",)),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, archs=("sm90",)),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2, archs=("sm80", "sm8x")),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, archs=("sm80", "sm8x")),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, archs=("interp",)),
]

# bf16 attention: load tiles through TMA tensor descriptors (Hopper's bulk copy engine) instead of
# pointer loads. H200, 3168 x (12672 + 2640) x 40 x 128, 128x64 w8 s3 (experiment, 2026-11-22): 2.18 ms
# with TMA vs 2.30 ms without; Triton's warp_specialize loop option changed nothing there (not used).
# Pre-Hopper GPUs have no TMA; the interpreter emulates descriptors (tests run both paths).
ATTENTION_TMA = {"sm90": True, "sm80": False, "sm8x": False, "interp": False}

# 8-bit attention (INT8 QK^T and INT8 PV): the same space. In the same sweep sm90 128x64 w8 s3 was its fastest
# too; the sm80/sm8x entries (both kernels) were chosen by an offline compile with Triton 3.6 (ptxas -v):
# 128x32 w8 s2 is the only tile that neither spills nor passes ~99 KB of shared memory; 128x64 w8 s2 spills a
# little.
ATTENTION8 = ATTENTION

# W8A8 GEMM (INT8 and FP8): BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step, grouped launch.
# sm90 FP8 sweep at 3168x5120x13824 (H200): 128x256x128 w8 s3 1091 TFLOP/s, 128x256x64 w8 s4 1015,
# 128x128x128 w8 s4 992, 256x128x128 w8 s3 990.
GEMM = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, archs=("sm90",)),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, archs=("sm90",)),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, archs=("sm90",)),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, archs=("sm80",)),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, archs=("sm80",)),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, archs=("sm8x",)),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, archs=("sm8x",)),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, archs=("sm8x",)),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1, archs=("interp",)),
]

# per-token activation quantization: one row per program; rows up to SINGLE_MAX columns are read
# once (held in registers, 16 warps past 8192 columns), longer rows in two passes of BLOCK columns
QUANT_ROWS = dict(BLOCK=2048, num_warps=8, SINGLE_MAX=16384)
QUANT_ROWS_INTERP = dict(BLOCK=64, num_warps=4, SINGLE_MAX=128)
# How gemm.quantize_rows(gelu=True) computes the FFN's GELU: "tanh" (torch's expression, libdevice tanhf on the
# GPU) or "sigmoid" (x / (1 + 2^(-2u log2 e)), the same function)
GELU_FORM = {"gpu": "sigmoid", "interp": "tanh"}

# FP8 GEMM engine per family: "triton" (ours, scales and bias in the epilogue) or "scaled_mm" (cuBLAS
# torch._scaled_mm row-wise, fed by our quantization kernel). On the H200 ours was 3-6% faster at all
# six model shapes (bench_kernels, 2026-11-21), so "triton" everywhere; "scaled_mm" stays selectable.
FP8_ENGINE = {"sm90": "triton", "sm80": "triton", "sm8x": "triton", "interp": "triton"}


# The sink keys' RoPE multipliers reach the attention kernels as per-token rows [Ls, D/2] gathered once per
# forward by the model. Gathering them inside the kernel from the table by position (dependent loads the
# pipeliner cannot prefetch) measured 3.93 ms for the sink alone vs 0.67 ms on the H200 (BENCHMARKS.md
# section 3) and was removed with the kernels' dependence on the model's RopeTable.


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETER_WHY = ("CPU kernel tests need Triton's interpreter: TRITON_INTERPRET=1 must be set before triton is "
                   "first imported (tests/conftest.py should set it when no CUDA GPU is present)")


def interpreter_ready() -> bool:
    """True when TRITON_INTERPRET=1 was set before triton was imported, so kernels can run on the CPU.

    Triton decides at import time whether its own library functions (tl.zeros, tl.max, ...) are
    interpreted; setting the variable later leaves them compiled-only and every launch fails."""
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def arch_family(device=None) -> str:
    """The family name of the device that runs the kernels ("interp" under the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "sm8x"


def select(space: list[dict], family: str | None = None) -> list[dict]:
    """The entries of `space` meant for `family` (the current device's by default), minus the tag."""
    family = family or arch_family()
    chosen = [{k: v for k, v in c.items() if k != "archs"} for c in space if family in c["archs"]]
    if not chosen:
        raise ValueError(f"no kernel config for device family {family!r}")
    return chosen
