"""The VAE's fused RMS norm + SiLU kernel (kernels/vae_norm.py) against its torch twin and the eager norm.

CPU: Triton's interpreter on odd shapes, NCDHW and NDHWC inputs, written into a view inside a padded
buffer. GPU (`-m cuda`): the decoder's real widths.
"""

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from lowvram.kernels import vae_norm  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402
from lowvram.model.vae_blocks import RMS_norm  # noqa: E402

on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)
CL = torch.channels_last_3d


def inputs(shape, dtype, fmt, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b, c, t, h, w = shape
    x = (3 * torch.randn(shape, generator=g) + 0.2).to(dtype).to(device).contiguous(memory_format=fmt)
    x[0, :, 0, 0, 0] = 0  # one all-zero pixel: the norm's eps clamp, output 0
    gamma = (1 + 0.2 * torch.randn(c, 1, 1, 1, generator=g)).to(dtype).to(device)
    buf = torch.full((b, c, t + 2, h + 2, w + 2), float("nan"), dtype=dtype, device=device)
    return x, gamma, buf.contiguous(memory_format=fmt)


def check(shape, dtype, fmt, seed, device="cpu", fast=True):
    x, gamma, buf = inputs(shape, dtype, fmt, seed, device)
    c = shape[1]
    out = buf[:, :, 2:, 1:-1, 1:-1]
    vae_norm.norm_silu_into(x, gamma, c ** 0.5, out, backend="triton", fast=fast)
    want = torch.empty_like(out)
    vae_norm.norm_silu_torch(x, gamma, c ** 0.5, want)
    # the twin is the eager norm's arithmetic
    norm = RMS_norm(c, images=False)
    norm.gamma = torch.nn.Parameter(gamma, requires_grad=False)
    eager = F.silu(norm(x)).to(dtype)
    assert torch.equal(want, eager)
    # fp32: reduction order only (exact), a few units more for the fast arithmetic's reciprocal and
    # division; bf16: one rounding of the result (the interpreter truncates, the GPU rounds to nearest), so
    # one unit of bf16 at most
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -21 if not fast else 2.0 ** -19
    diff = (out.float() - want.float()).abs()
    assert (diff <= 2 * ulp * want.float().abs() + 1e-6).all(), diff.max()
    assert torch.equal(out[0, :, 0, 0, 0], torch.zeros_like(out[0, :, 0, 0, 0]))
    # the padding around the written view is untouched
    assert torch.isnan(buf[:, :, :2]).all() and torch.isnan(buf[:, :, 2:, 0]).all()
    assert torch.isnan(buf[:, :, 2:, :, -1]).all()
    return out, want


@on_cpu
@pytest.mark.parametrize("fast", [True, False])  # the arithmetics: one reciprocal a pixel / IEEE divisions
@pytest.mark.parametrize("tiles", ["interp", "gpu"])  # several rows per program / the GPU's one row
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_twin_into_padded_view(fmt, dtype, tiles, fast, monkeypatch):
    if tiles == "gpu":
        monkeypatch.setattr(vae_norm, "interpreting", lambda: False)
    check((2, 24, 3, 5, 37), dtype, fmt, seed=1, fast=fast)


@on_cpu
def test_kernel_channels_wider_than_one_tile_row_and_odd_count():
    out, want = check((1, 96 + 7, 2, 3, 11), torch.float32, CL, seed=2)
    assert out.abs().mean() > 0.1  # not trivially zero


def test_torch_backend_and_bad_shapes():
    x, gamma, buf = inputs((1, 8, 2, 3, 4), torch.float32, torch.contiguous_format, seed=3)
    out = buf[:, :, 2:, 1:-1, 1:-1]
    vae_norm.norm_silu_into(x, gamma, 8 ** 0.5, out, backend="torch")
    want = torch.empty_like(out)
    vae_norm.norm_silu_torch(x, gamma, 8 ** 0.5, want)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="one 5-D shape"):
        vae_norm.norm_silu_into(x, gamma, 1.0, out[:, :, 1:], backend="torch")


@pytest.mark.cuda
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("c", [96, 192, 384])
def test_kernel_on_gpu_real_widths(fmt, c, fast):
    out, want = check((1, c, 2, 48, 88), torch.bfloat16, fmt, seed=4, device="cuda", fast=fast)
    assert (out == want).float().mean() > 0.97
    # fp32 on the GPU: the fast arithmetic within a few units of the twin (the hardware's fast division,
    # exp and reciprocal: what the interpreter, computing them exactly, cannot check)
    check((1, c, 2, 48, 88), torch.float32, fmt, seed=5, device="cuda", fast=fast)


@on_cpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_norm_adds_the_conv_bias_first(fmt):
    """With bias: the norm of x + bias (fp32), as the twin computes it; the padding untouched."""
    x, gamma, buf = inputs((1, 24, 3, 5, 37), torch.float32, fmt, seed=6)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(7))
    out = buf[:, :, 2:, 1:-1, 1:-1]
    vae_norm.norm_silu_into(x, gamma, 24 ** 0.5, out, backend="triton", bias=bias)
    want = torch.empty_like(out)
    vae_norm.norm_silu_torch(x + bias.view(1, -1, 1, 1, 1), gamma, 24 ** 0.5, want)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)
    assert torch.isnan(buf[:, :, :2]).all() and torch.isnan(buf[:, :, 2:, 0]).all()
    with pytest.raises(ValueError, match="bias has 5 elements"):
        vae_norm.norm_silu_into(x, gamma, 1.0, out, bias=bias[:5])


@on_cpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_residual_one_pass_into_a_strided_view(backend):
    """y += bias + res: y a channel slice of a wider channels-last tensor (out_align's view), res contiguous;
    bf16 within one rounding of the fp32 sum, the channels beyond the view untouched."""
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(1, 32, 3, 5, 37, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    y = wide[:, :24]
    before = wide.clone()
    res = torch.randn(1, 24, 3, 5, 37, generator=g).to(torch.bfloat16)
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    want = before[:, :24].float() + bias.float().view(1, -1, 1, 1, 1) + res.float()
    got = vae_norm.bias_residual_(y, bias, res, backend=backend)
    assert got is y
    assert ((y.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()
    assert torch.equal(wide[:, 24:], before[:, 24:])
    with pytest.raises(ValueError, match="one 5-D shape"):
        vae_norm.bias_residual_(y, bias, res[:, :, 1:], backend=backend)
