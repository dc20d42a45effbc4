"""SageAttention 2 (github.com/thu-ml/SageAttention, Apache-2.0) as lowvram's attention "sage".

INT8 Q·K^T with per-thread Q/K scales after K is smoothed (its mean over the keys subtracted: exact for the
softmax, and the outlier channels of real keys no longer set the scale), then P·V in FP8 e4m3 with V scaled
per channel. The QK^T error is what the softmax amplifies, and INT8 with fine scales keeps it small where
e4m3's 3-bit mantissa cannot (cuDNN's per-tensor FP8 SDPA: 19.7 dB, BENCHMARKS.md section 3); P is in [0, 1]
and its FP8 error averages out over the keys. The library picks its kernel by the GPU:
- sm_90 (H100/H200): a wgmma kernel (`sageattn_qk_int8_pv_fp8_cuda_sm90`, PV accumulated in fp32 + fp32);
- sm_89 (RTX 40): mma.sync FP8 (`sageattn_qk_int8_pv_fp8_cuda`, fp32 + fp16 accumulation);
- sm_80 (A100): INT8 QK^T, fp16 PV (`sageattn_qk_int8_pv_fp16_cuda`); sm_86 (RTX 30): its Triton kernel.

Not a dependency: it has no wheels on PyPI and builds against the local CUDA toolkit
(`pip install --no-build-isolation git+https://github.com/thu-ml/SageAttention.git`); `--attention sage` uses it,
`tools/build_sage.py` builds it on the bench machine. Inputs as torch SDPA's here: bf16 q [B, Lq, H, D] and the
joined keys/values [B, Lk, H, D] (window and roped sink), D <= 128.
Measured on an H100 at the model's shape (B 1, 3168 x 15312, 40 x 128; BENCHMARKS.md section 3): the sm_90 kernel
alone 1.30 ms against cuDNN bf16's 1.88, but the library's per-call quantization takes 0.99 ms (K's mean 0.08,
INT8 Q/K 0.33, V's padding 0.12, V to FP8 0.47), so a call is 2.16 ms, and "auto" does not take it. Keeping the
window's keys and values in the kernel's formats in the step caches (quantized once, when written) is what would
make it pay; its attention-output SQNR on keys with outlier channels is 27.9 dB, the whole forward's 39 dB.
"""

from __future__ import annotations

import torch

KERNELS = {(9, 0): "sm90", (8, 9): "sm89", (8, 0): "sm80", (8, 6): "triton"}  # the library's dispatch (sageattn)


def kernel_for(capability: tuple[int, int]) -> str | None:
    """Which of the library's kernels runs on a GPU of this compute capability (None: it has none)."""
    return KERNELS.get(tuple(capability))


def unavailable(device: torch.device | str = "cuda") -> str | None:
    """Why sage_attention cannot run on `device` (None when it can): no GPU, an arch the library has no kernel for,
    the library missing, or built without this arch's kernel."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU"
    cap = torch.cuda.get_device_capability(device)
    kernel = kernel_for(cap)
    if kernel is None:
        return f"SageAttention has no kernel for sm_{cap[0]}{cap[1]}"
    try:
        from sageattention import core
    except (ImportError, OSError) as e:
        return (f"sageattention is not importable ({type(e).__name__}: {e}); "
                "pip install --no-build-isolation git+https://github.com/thu-ml/SageAttention.git")
    built = {"sm90": "SM90_ENABLED", "sm89": "SM89_ENABLED", "sm80": "SM80_ENABLED"}.get(kernel)
    if built is not None and not getattr(core, built, False):
        return f"sageattention was built without its {kernel} kernel (reinstall it on this machine)"
    return None


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v by SageAttention; q [B, Lq, H, D], k / v [B, Lk, H, D] bf16 -> [B, Lq, H, D]."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def quantize_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The sm_90 path's per-call quantization alone (as the library's sageattn_qk_int8_pv_fp8_cuda_sm90 does it):
    K's mean, INT8 Q/K with per-thread scales, V padded to 128 keys and cast to e4m3 per channel. For the
    benchmark's kernel-alone timing (`kernel_sm90`)."""
    from sageattention.core import per_channel_fp8, per_thread_int8_triton

    km = k.mean(dim=1, keepdim=True)
    q8, sq, k8, sk = per_thread_int8_triton(q, k, km, tensor_layout="NHD", BLKQ=64, WARPQ=16, BLKK=128, WARPK=128)
    pad = -k.shape[1] % 128
    if pad:
        v = torch.cat([v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], dim=1)
    v8, sv, _ = per_channel_fp8(v, tensor_layout="NHD", smooth_v=False)
    return dict(q=q8, sq=sq, k=k8, sk=sk, v=v8, sv=sv, shape=q.shape, dtype=q.dtype)


def kernel_sm90(x: dict) -> torch.Tensor:
    """The sm_90 attention kernel alone on `quantize_sm90`'s output."""
    from sageattention import sm90_compile

    o = torch.empty(x["shape"], dtype=x["dtype"], device=x["q"].device)
    sm90_compile.qk_int8_sv_f8_accum_f32_fuse_v_scale_attn_inst_buf(
        x["q"], x["k"], x["v"], o, x["sq"], x["sk"], x["sv"], 0, 0, 3, x["shape"][-1] ** -0.5, 0)
    return o
