"""FlashAttention 4 (`pip install flash-attn-4`, Dao-AILab, BSD-3; CuTe DSL kernels compiled at first use) as
lowvram's attention "fa4": exact bf16 attention (no quantization), Hopper's FA3-style kernel on sm_90
(warp-specialized, the softmax overlapped with the two GEMMs), for the profiles whose attention is cuDNN's bf16.

Not a dependency: its CUDA DSL wheel is large and it needs a CUDA 12.8+ driver; `--attention fa4` uses it where it
imports. Inputs as torch SDPA's here: bf16 q [B, Lq, H, D] and the joined keys/values [B, Lk, H, D] (window and
roped sink), which is FlashAttention's own layout (no transposes).
"""

from __future__ import annotations

import torch

SUPPORTED_SM = (9, 10)  # FA4's forward kernels for Hopper and Blackwell data-centre GPUs (its sm_80 path is FA2's)


def unavailable(device: torch.device | str = "cuda") -> str | None:
    """Why fa4_attention cannot run on `device` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_SM:
        return f"FlashAttention 4 runs on sm_90 and sm_100 here, not sm_{major}{minor}"
    try:
        import flash_attn.cute  # noqa: F401
    except (ImportError, OSError) as e:
        return f"flash-attn-4 is not importable ({type(e).__name__}: {e}); pip install flash-attn-4"
    return None


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v by FlashAttention 4; q [B, Lq, H, D], k / v [B, Lk, H, D] bf16 -> [B, Lq, H, D]."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out
