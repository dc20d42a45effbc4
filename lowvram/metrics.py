"""Accuracy measures shared by the kernels' tests, the quantizer and the tools (plain torch, no lowvram imports)."""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 22  # elements per fp32 chunk: bounds the temporaries of measuring a big weight to 16 MB


def power_ratio_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) of two sums of squares: inf without noise, -inf without signal."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor, chunk: int = CHUNK) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `ref`: 10·log10(Σref² / Σ(ref − approx)²) in dB
    (inf if equal; NaN propagates). Same shapes; norms in fp32 per chunk of `chunk` elements, summed in float64."""
    r, a = ref.detach().reshape(-1), approx.detach().reshape(-1)
    if r.shape != a.shape:
        raise ValueError(f"sqnr_db: shapes differ, {list(ref.shape)} vs {list(approx.shape)}")
    signal = noise = 0.0
    for i in range(0, r.numel(), chunk):
        rc = r[i:i + chunk].float()
        signal += torch.linalg.vector_norm(rc).item() ** 2
        noise += torch.linalg.vector_norm(rc - a[i:i + chunk].float()).item() ** 2
    return power_ratio_db(signal, noise)
