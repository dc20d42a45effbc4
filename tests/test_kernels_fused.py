"""Fused row kernels (kernels/fused.py) against their torch twins, the block's eager arithmetic.

CPU: Triton's interpreter on small odd shapes (a row length that is not a power of two, 11 tokens
per frame, two batch entries). GPU (`-m cuda`): the model's width, and a whole Block with the
kernels against the same Block with the twins.
"""

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowvram.kernels import fused, gemm  # noqa: E402
from lowvram.kernels import rowquant as RQ  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402
from lowvram.model.rope import RopeTable, grid_positions  # noqa: E402

BF = torch.bfloat16
on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def same_rounding(a, b, dtype):
    """a and b equal up to the last bits. On the GPU nearly all bf16 elements are bit-equal (only the
    reductions' order differs); Triton's interpreter rounds fp32 -> bf16 toward zero (not to nearest,
    as the GPU and torch do), so there each rounding may differ by one unit."""
    a, b = a.float(), b.float()
    assert a.shape == b.shape and torch.isfinite(a).all()
    ulp = 2.0 ** -7 if dtype == BF else 2.0 ** -20
    k = 2 if a.is_cuda else 4  # units of an intermediate's rounding, carried into small outputs by cancellation
    torch.testing.assert_close(a, b, rtol=k * ulp, atol=k * ulp * b.abs().mean().item())
    assert (a - b).norm() <= k / 2 * ulp * b.norm()
    if dtype == BF and a.is_cuda:
        assert (a == b).float().mean() > 0.97
    return a, b


def rope_tables(L, D, frames=3, seed=0):
    pos = grid_positions(range(5, 5 + frames), range(L // frames), range(1))
    cos, sin = RopeTable.build(D, 1024).gather(pos)
    return cos, sin


def shapes_and_inputs(device, dtype, C=96, B=2, frames=3, L=33, seed=1):
    g = gen(seed)
    x = (torch.randn(B, L, C, generator=g) * 3 + 0.5).to(device=device, dtype=dtype)
    y = torch.randn(B, L, C, generator=g).to(device=device, dtype=BF)
    shift = (torch.randn(B, frames, C, generator=g) * 0.3).to(device)
    scale = (torch.randn(B, frames, C, generator=g) * 0.3).to(device)
    return x, y, shift, scale


@on_cpu
@pytest.mark.parametrize("dtype,rope", [(BF, True), (BF, False), (torch.float32, False)])
def test_rms_norm_rope(dtype, rope):
    x, *_ = shapes_and_inputs("cpu", dtype, C=2 * 48)  # two heads of 48: 24 pairs, not a power of two
    w = (1 + 0.1 * torch.randn(96, generator=gen(3))).to(dtype)
    cs = rope_tables(33, 48) if rope else (None, None)
    out = fused.rms_norm_rope(x, w, 1e-6, *cs, heads=2, backend="triton")
    ref = fused.rms_norm_rope(x, w, 1e-6, *cs, heads=2, backend="torch")
    same_rounding(out, ref, dtype)
    if rope:  # the rotation happened (positions differ per token)
        plain = fused.rms_norm_rope(x, w, 1e-6, heads=2, backend="torch")
        assert (plain.float() - ref.float()).abs().max() > 0.1


@on_cpu
@pytest.mark.parametrize("case", ["norm1", "norm3", "norm2"])
def test_layer_norm_mod(case):
    dtype = BF if case == "norm1" else torch.float32
    x, _, shift, scale = shapes_and_inputs("cpu", dtype)
    kw = norm_kwargs(case, shift, scale)
    out = fused.layer_norm_mod(x, 1e-6, backend="triton", **kw)
    ref = fused.layer_norm_mod(x, 1e-6, backend="torch", **kw)
    same_rounding(out, ref, BF)


def norm_kwargs(case, shift, scale):
    """layer_norm_mod's keywords as the block calls it for norm1 / norm2 (modulated) and norm3 (affine)."""
    if case == "norm3":  # affine, on x rounded to bf16, no modulation
        return dict(weight=1 + 0.1 * torch.randn(96, generator=gen(4)), bias=0.1 * torch.randn(96, generator=gen(5)),
                    round_in=True, out_dtype=BF)
    return dict(shift=shift, scale=scale, frames=3, out_dtype=BF)


@on_cpu
@pytest.mark.parametrize("case,fp8,keep_h", [("norm1", False, True), ("norm1", True, False), ("norm3", False, False),
                                             ("norm2", True, True)])
def test_layer_norm_mod_quant_is_the_norm_then_the_quantizer(case, fp8, keep_h):
    # bit-identical to layer_norm_mod followed by the GEMM's quantization kernel: the same rounded row
    x, _, shift, scale = shapes_and_inputs("cpu", BF if case == "norm1" else torch.float32, seed=7 + fp8)
    kw = norm_kwargs(case, shift, scale)
    h, qr = fused.layer_norm_mod_quant(x, 1e-6, fp8=fp8, keep_h=keep_h, backend="triton", **kw)
    want = fused.layer_norm_mod(x, 1e-6, backend="triton", **kw)
    q, s = gemm.quantize_rows(want.reshape(-1, 96), fp8=fp8)
    assert qr.shape == (2, 33, 96) and qr.dtype == BF and qr.scheme == ("fp8" if fp8 else "int8")
    assert torch.equal(qr.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qr.scale, s)
    assert (h is None) != keep_h and (h is None or torch.equal(h, want))
    # the torch twin: layer_norm_mod's twin, then rowquant's torch functions
    h, qr = fused.layer_norm_mod_quant(x, 1e-6, fp8=fp8, keep_h=True, backend="torch", **kw)
    want = fused.layer_norm_mod(x, 1e-6, backend="torch", **kw)
    q, s = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(want.reshape(-1, 96))
    assert torch.equal(h, want) and torch.equal(qr.q.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(qr.scale, s)


@on_cpu
@pytest.mark.parametrize("fp8", [None, False, True])
def test_add_layer_norm_mod_is_the_sum_then_the_norm(fp8):
    # the block's x (fp32) + cross-attention (bf16), then norm2 (modulated) and its 8-bit rows, in one pass: the
    # sum's bits those of the eager sum, the norm's and the codes those of the two kernels it replaces
    x, _, shift, scale = shapes_and_inputs("cpu", torch.float32, seed=11)
    y = (torch.randn(x.shape, generator=gen(12)) * 3).to(BF)
    kw = norm_kwargs("norm2", shift, scale)
    s, got = fused.add_layer_norm_mod(x, y, 1e-6, fp8=fp8, backend="triton", **kw)
    assert s.dtype == torch.float32 and torch.equal(s, x + y)
    if fp8 is None:
        same_rounding(got, fused.layer_norm_mod(x + y, 1e-6, backend="torch", **kw), BF)
        assert torch.equal(got, fused.layer_norm_mod(x + y, 1e-6, backend="triton", **kw))
    else:
        want = fused.layer_norm_mod_quant(x + y, 1e-6, fp8=fp8, backend="triton", **kw)[1]
        assert got.shape == want.shape and got.scheme == want.scheme
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)
    st, twin = fused.add_layer_norm_mod(x, y, 1e-6, fp8=fp8, backend="torch", **kw)  # the torch twin
    assert torch.equal(st, x + y)
    if fp8 is None:
        assert torch.equal(twin, fused.layer_norm_mod(x + y, 1e-6, backend="torch", **kw))
    with pytest.raises(ValueError, match="adds y"):
        fused.add_layer_norm_mod(y, x, 1e-6, fp8=fp8, backend="triton", **kw)  # a bf16 x would round the sum


@on_cpu
@pytest.mark.parametrize("xdtype,fp8", [(BF, None), (BF, False), (BF, True), (torch.float32, None)])
def test_gated_layer_norm_mod_is_the_gate_then_the_norm(xdtype, fp8):
    """The block's x (bf16 at its start) + self-attention * gate1 per frame, then norm3 (affine, on the sum rounded
    to bf16) and its 8-bit rows, in one pass: the sum's bits those of gated_residual's kernel, the norm's and the
    codes those of the kernels it replaces; the torch twin is the two eager steps."""
    x, y, gate, _ = shapes_and_inputs("cpu", xdtype, seed=15)
    kw = norm_kwargs("norm3", None, None)
    s, got = fused.gated_layer_norm_mod(x, y, gate, 3, 1e-6, fp8=fp8, backend="triton", **kw)
    want_s = fused.gated_residual(x, y, gate, 3, backend="triton")
    assert s.dtype == torch.float32 and torch.equal(s, want_s)
    same_rounding(s, fused.gated_residual(x, y, gate, 3, backend="torch"), torch.float32)
    if fp8 is None:
        assert torch.equal(got, fused.layer_norm_mod(want_s, 1e-6, backend="triton", **kw))
    else:
        want = fused.layer_norm_mod_quant(want_s, 1e-6, fp8=fp8, backend="triton", **kw)[1]
        assert got.shape == want.shape and got.scheme == want.scheme and got.dtype == BF
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)
    st, twin = fused.gated_layer_norm_mod(x, y, gate, 3, 1e-6, fp8=fp8, backend="torch", **kw)
    eager_s = fused.gated_residual_torch(x, y, gate, 3)
    eager_h = fused.layer_norm_mod_torch(eager_s, 1e-6, **kw)
    assert torch.equal(st, eager_s)
    if fp8 is None:
        assert torch.equal(twin, eager_h)
    else:
        q, sc = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(eager_h.reshape(-1, 96))
        assert torch.equal(twin.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(twin.scale, sc)
    with pytest.raises(ValueError, match="adds y"):
        fused.gated_layer_norm_mod(x, y[:, :5], gate, 3, 1e-6, backend="triton", **kw)


def _ada_case(device, C=96, T=33, N=4, seed=21):
    """The audio injector's AdaLN inputs: bf16 tokens [N, T, C] (N sample-frames) with an offset and spread per
    row, and shift/scale [N, C] in bf16 as its linear gives them (scale near and past -1 too)."""
    g = gen(seed)
    x = (torch.randn(N, T, C, generator=g) * (1 + 3 * torch.rand(N, T, 1, generator=g)) + 2).to(device, BF)
    shift = torch.randn(N, C, generator=g).to(device, BF)
    scale = (torch.randn(N, C, generator=g) * 1.5).to(device, BF)
    return x, shift, scale


@on_cpu
@pytest.mark.parametrize("fp8", [None, False, True])
def test_ada_layer_norm_is_the_eager_adain(fp8):
    """The injector's AdaLN in one pass: the eager arithmetic's values (an fp32 LayerNorm, not rounded, times
    (1 + scale) rounded in bf16, plus shift, rounded to bf16) within the interpreter's rounding; its 8-bit rows
    are the quantizer's of the kernel's own rounded rows; the torch twin is the eager code bit for bit."""
    x, shift, scale = _ada_case("cpu")
    eager = fused.ada_layer_norm_torch(x, shift, scale)
    assert eager.dtype == torch.float32
    h = fused.ada_layer_norm(x, shift, scale, backend="triton")
    same_rounding(h, eager.to(BF), BF)
    # not the block's norm: rounding the LayerNorm to bf16 first, or (1 + scale) in fp32, gives other values
    other = fused.layer_norm_mod(x, 1e-5, shift=shift[:, None].float(), scale=scale[:, None].float(), backend="torch")
    assert not torch.equal(other, eager.to(BF))
    if fp8 is not None:
        qr = fused.ada_layer_norm(x, shift, scale, fp8=fp8, backend="triton")
        q, s = gemm.quantize_rows(h.reshape(-1, 96), fp8=fp8)
        assert qr.shape == x.shape and qr.dtype == BF and qr.scheme == ("fp8" if fp8 else "int8")
        assert torch.equal(qr.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qr.scale, s)
    twin = fused.ada_layer_norm(x, shift, scale, fp8=fp8, backend="torch")
    if fp8 is None:
        assert torch.equal(twin, eager.to(BF))
    else:
        q, s = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(eager.to(BF).reshape(-1, 96))
        assert torch.equal(twin.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(twin.scale, s)


@on_cpu
@pytest.mark.parametrize("xdtype,out_dtype", [(BF, None), (torch.float32, BF), (torch.float32, None)])
def test_gated_residual(xdtype, out_dtype):
    x, y, gate, _ = shapes_and_inputs("cpu", xdtype, C=2500)  # two column tiles, the second partial
    out = fused.gated_residual(x, y, gate, 3, out_dtype=out_dtype, backend="triton")
    ref = fused.gated_residual(x, y, gate, 3, out_dtype=out_dtype, backend="torch")
    assert out.dtype == ref.dtype == (out_dtype or torch.float32)
    same_rounding(out, ref, out.dtype)


@on_cpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("xdtype,out_dtype", [(torch.float32, BF), (BF, torch.float32)])
def test_gated_residual_rows_are_those_rows_of_gated_residual(backend, xdtype, out_dtype):
    """Chunks of the flattened [B*L, C] rows (ends inside a frame and across the two samples) written into one
    output by gated_residual_rows: bit for bit gated_residual of the whole (the gate's frame counted from each
    chunk's first row); the rows outside a chunk are left as they were."""
    x, y, gate, _ = shapes_and_inputs("cpu", xdtype, C=2500)  # B 2, 3 frames of 11 tokens
    want = fused.gated_residual(x, y, gate, 3, out_dtype=out_dtype, backend=backend)
    x2, y2 = x.reshape(66, 2500), y.reshape(66, 2500)
    out = torch.full((66, 2500), float("nan"), dtype=out_dtype)
    for a, e in ((0, 7), (7, 40), (40, 66)):
        got = fused.gated_residual_rows(x2[a:e], y2[a:e], gate, 11, a, out[a:e], backend=backend)
        assert got.data_ptr() == out[a:e].data_ptr()
        assert torch.isnan(out[e:]).all()
    assert torch.equal(out, want.reshape(66, 2500))
    wrong = fused.gated_residual_rows(x2[7:40], y2[7:40], gate, 11, 0, out[7:40].clone(), backend=backend)
    assert not torch.equal(wrong, want.reshape(66, 2500)[7:40])  # the offset matters: the control


def test_auto_is_torch_on_the_cpu_and_bad_backend_refused():
    x = torch.randn(1, 4, 8)
    assert not fused.use_triton(x, "auto") and not fused.use_triton(x, "torch")
    with pytest.raises(ValueError, match="backend"):
        fused.use_triton(x, "fast")


@cuda
@needs_cuda
def test_kernels_at_model_width_on_gpu():
    x, y, shift, scale = shapes_and_inputs("cuda", BF, C=5120, L=3 * 352, frames=3)
    w = (1 + 0.1 * torch.randn(5120, generator=gen(3))).to("cuda", BF)
    cos, sin = (t.cuda() for t in rope_tables(3 * 352, 128))
    a = fused.rms_norm_rope(x, w, 1e-6, cos, sin, heads=40, backend="triton")
    b = fused.rms_norm_rope(x, w, 1e-6, cos, sin, heads=40, backend="torch")
    same_rounding(a, b, BF)
    a = fused.layer_norm_mod(x, 1e-6, shift=shift, scale=scale, frames=3, backend="triton")
    b = fused.layer_norm_mod(x, 1e-6, shift=shift, scale=scale, frames=3, backend="torch")
    same_rounding(a, b, BF)
    a = fused.gated_residual(x, y, shift, 3, backend="triton")
    b = fused.gated_residual(x, y, shift, 3, backend="torch")
    same_rounding(a, b, torch.float32)
    h = fused.layer_norm_mod(x, 1e-6, shift=shift, scale=scale, frames=3, backend="triton")
    for fp8 in (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,):
        _, qr = fused.layer_norm_mod_quant(x, 1e-6, shift=shift, scale=scale, frames=3, fp8=fp8, backend="triton")
        q, s = gemm.quantize_rows(h.reshape(-1, 5120), fp8=fp8)
        # two compilations of one kernel (h stored / h quantized) may round the LayerNorm's fp32 statistics
        # differently (H200: a few codes in 10^5 one step apart, scales one bf16 unit of the absmax); the
        # interpreter's tests ask for the same bits
        assert (qr.q.view(torch.uint8) == q.view(torch.uint8)).float().mean() > 0.999
        torch.testing.assert_close(qr.scale, s, rtol=2 ** -7, atol=0)


@cuda
@needs_cuda
@pytest.mark.parametrize("fp8", [None, False, True])
def test_gpu_gated_layer_norm_mod_is_the_gate_then_the_norm(fp8):
    """At the model's width: the fp32 sum gated_residual's kernel's, norm3's rows and codes those of the kernels it
    replaces (the same code, the sum kept instead of read back; the two kernels may contract x + y * g alike)."""
    x, y, gate, _ = shapes_and_inputs("cuda", BF, C=5120, L=3 * 64, seed=16)
    kw = dict(weight=(1 + 0.1 * torch.randn(5120, generator=gen(4))).cuda(), bias=(0.1 * torch.randn(5120)).cuda(),
              round_in=True, out_dtype=BF)
    s, got = fused.gated_layer_norm_mod(x, y, gate, 3, 1e-6, fp8=fp8, **kw)
    want_s = fused.gated_residual(x, y, gate, 3)
    same_rounding(s, want_s, torch.float32)
    assert (s == want_s).float().mean() > 0.999
    if fp8 is None:
        same_rounding(got, fused.layer_norm_mod(want_s, 1e-6, **kw), BF)
    elif fp8 is False or torch.cuda.get_device_capability() >= (8, 9):
        want = fused.layer_norm_mod_quant(want_s, 1e-6, fp8=fp8, **kw)[1]
        assert (got.q.view(torch.uint8) == want.q.view(torch.uint8)).float().mean() > 0.999
        torch.testing.assert_close(got.scale, want.scale, rtol=2 ** -7, atol=0)


@cuda
@needs_cuda
def test_gpu_ada_layer_norm_at_model_width():
    """At the model's width and one block's frames of a batch of 4 (12 sample-frames of 1056 tokens): the eager
    AdaLN's bf16 values (the reductions' order aside), and 8-bit rows the quantizer's of those rows."""
    x, shift, scale = _ada_case("cuda", C=5120, T=1056, N=12)
    h = fused.ada_layer_norm(x, shift, scale)
    same_rounding(h, fused.ada_layer_norm_torch(x, shift, scale).to(BF), BF)
    for fp8 in (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,):
        qr = fused.ada_layer_norm(x, shift, scale, fp8=fp8)
        q, s = gemm.quantize_rows(h.reshape(-1, 5120), fp8=fp8)
        assert (qr.q.view(torch.uint8) == q.view(torch.uint8)).float().mean() > 0.999  # as the block's norms
        torch.testing.assert_close(qr.scale, s, rtol=2 ** -7, atol=0)


@cuda
@needs_cuda
@pytest.mark.parametrize("fp8", [None, False, True])
def test_gpu_add_layer_norm_mod_is_the_sum_then_the_norm(fp8):
    # at the model's width (5120) and a batch's rows: the sum exactly the eager one, the norm's rows and codes those
    # of the kernels it replaces (the same kernel code with the sum loaded instead of stored and read back)
    x, _, shift, scale = shapes_and_inputs("cuda", torch.float32, C=5120, L=3 * 64, seed=13)
    y = (torch.randn(x.shape, generator=gen(14)) * 3).to("cuda", BF)
    kw = norm_kwargs("norm2", shift, scale)
    s, got = fused.add_layer_norm_mod(x, y, 1e-6, fp8=fp8, **kw)
    assert torch.equal(s, x + y)
    if fp8 is None:
        assert torch.equal(got, fused.layer_norm_mod(x + y, 1e-6, **kw))
    else:
        want = fused.layer_norm_mod_quant(x + y, 1e-6, fp8=fp8, **kw)[1]
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)


@cuda
@needs_cuda
def test_block_with_kernels_matches_block_with_twins(monkeypatch):
    from lowvram.model.attention import sdpa
    from lowvram.model.layers import Block

    torch.manual_seed(0)
    blk = Block(256, 512, 2).to("cuda", BF)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
    x = torch.randn(1, 3 * 40, 256, device="cuda").to(BF)
    e0 = torch.randn(1, 3, 6, 256, device="cuda") * 0.1
    ctx = torch.randn(1, 16, 256, device="cuda").to(BF)
    cos, sin = (t.cuda() for t in rope_tables(3 * 40, 128, frames=3))
    with torch.no_grad():
        a = blk(x, e0, ctx, sdpa, 3, rope=(cos, sin))
        monkeypatch.setattr(fused, "use_triton", lambda x, backend: False)
        b = blk(x, e0, ctx, sdpa, 3, rope=(cos, sin))
    rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel < 1e-2, rel



def _rope_case(device, L=37, H=3, D=10, B=2, seed=31):
    g = gen(seed)
    x = (torch.randn(B, L, H, D, generator=g) * 3).to(device, BF)
    ang = torch.rand(L, D // 2, generator=g) * 6.3
    return x, ang.cos().half().to(device), ang.sin().half().to(device)


@on_cpu
def test_rope_kernel_against_rope_apply():
    """The sink's one-pass RoPE (fused.rope) at odd sizes (3 heads of 10 channels, 37 tokens, B 2), fp16
    multipliers as the model's table gives: rope_apply's values within the rounding of the interpreter's bf16
    cast (the GPU test below asks for the same bits); fp32 keys take rope_apply itself."""
    from lowvram.kernels.reference import rope_apply

    x, cos, sin = _rope_case("cpu")
    got, want = fused.rope(x, cos, sin, backend="triton"), rope_apply(x, cos, sin)
    same_rounding(got, want, BF)
    assert (got.float() - x.float()).abs().max() > 0.5  # it rotated
    assert torch.equal(fused.rope(x.float(), cos, sin, backend="triton"), rope_apply(x.float(), cos, sin))
    assert fused.rope(x[:, :0], cos[:0], sin[:0], backend="triton").shape == (2, 0, 3, 10)
    room = torch.full((3, 2, 37, 3, 10), 7.0, dtype=x.dtype)  # out=: a contiguous view, written in place
    got = fused.rope(x, cos, sin, backend="triton", out=room[1])
    assert got.data_ptr() == room[1].data_ptr() and torch.equal(room[1], fused.rope(x, cos, sin, backend="triton"))
    assert (room[0] == 7).all() and (room[2] == 7).all()
    strided = torch.zeros(37, 2, 3, 10, dtype=x.dtype).transpose(0, 1)  # not contiguous: rope_apply, then a copy
    assert fused.rope(x, cos, sin, backend="triton", out=strided) is strided and torch.equal(strided, want)
    with pytest.raises(ValueError, match="rope out= must be"):
        fused.rope(x, cos, sin, out=room[1, :, :5])


@cuda
@needs_cuda
def test_rope_kernel_is_rope_apply_bit_for_bit_on_gpu():
    """At the sink's size (2640 tokens, 40 heads of 128): each bf16 x fp16 product is exact in fp32 and each sum
    rounds once, in the kernel as in rope_apply, so the bits are the same."""
    from lowvram.kernels.reference import rope_apply

    x, cos, sin = _rope_case("cuda", L=2640, H=40, D=128, B=1)
    assert torch.equal(fused.rope(x, cos, sin), rope_apply(x, cos, sin))
