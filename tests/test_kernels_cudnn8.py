"""kernels/cudnn8.py, cuDNN's FP8 attention (a measured candidate, not a profile's backend): it says why it cannot
run where it cannot, and on a Hopper GPU with nvidia-cudnn-frontend it computes attention (`-m cuda`)."""

import pytest
import torch

from lowvram.kernels import cudnn8
from lowvram.metrics import sqnr_db


def test_unavailable_says_why_on_the_cpu():
    why = cudnn8.unavailable("cpu")
    assert why is not None and "CUDA" in why


def test_quantize_qkv_smooths_k_and_scales_per_tensor():
    """Smoothed K (its mean over the keys removed) and per-tensor e4m3 scales amax / 448: dequantized, Q and V
    come back within e4m3's rounding and K minus its mean likewise, from fresh random inputs with offset channels."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 9, 2, 16, generator=g).bfloat16()
    k = (torch.randn(1, 23, 2, 16, generator=g) + torch.randn(1, 1, 2, 16, generator=g) * 6).bfloat16()
    v = torch.randn(1, 23, 2, 16, generator=g).bfloat16()
    x = cudnn8.quantize_qkv(q, k, v)
    ks = k.float() - k.float().mean(1, keepdim=True)
    for name, want in (("q", q.float()), ("k", ks), ("v", v.float())):
        got = x[name].float() * x["s" + name].view(1)
        assert x[name].dtype == torch.float8_e4m3fn and x["s" + name].shape == (1, 1, 1, 1)
        assert abs(x["s" + name].item() - want.abs().max().item() / cudnn8.FP8_MAX) < 1e-2 * x["s" + name].item()
        assert sqnr_db(want, got) > 25  # e4m3: 3 mantissa bits
    assert x["k"].float().abs().max() <= cudnn8.FP8_MAX


@pytest.mark.cuda
def test_fp8_sdpa_on_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = cudnn8.unavailable("cuda")
    if why is not None:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(1, n, 4, 128, device="cuda", generator=g).bfloat16() for n in (256, 640, 640))
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    got = cudnn8.fp8_sdpa(q, k, v)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert sqnr_db(want.float(), got.float()) > 15  # per-tensor e4m3 Q/K/V/O: ~20 dB (BENCHMARKS.md section 3)
