"""Quantize once, feed many (lowvram.quantize.fuse): QuantLinear on a shared 8-bit copy of its input, where sharing
is allowed, the FFN with GELU in its first GEMM, and a whole Block fused against the same Block unfused.

CPU: the kernels under Triton's interpreter (the triton backend named explicitly; "auto" keeps the weight-only
reference on the CPU, where nothing is shared), small odd shapes (96 channels, 2 heads of 48, ffn 200, 3 frames of
11 tokens). GPU (`-m cuda`): the same Block on the compiled kernels with "auto".
Exact: sharing one quantized copy, and a norm writing it, give the unfused bits (the same rule on the same bf16
values). Bounded: the GELU epilogue's tanh against torch's (one bf16 unit of a hidden element, gemm.gelu_linear),
which can move the codes of a row whose absmax moved: the fused output then differs from the unfused by less than
half of what the activation quantization itself changes (the unfused W8A8 output against the weight-only one).
"""

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

pytest.importorskip("triton")

from lowvram.kernels import fused, gemm  # noqa: E402
from lowvram.kernels import reference as R  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402
from lowvram.kernels.rowquant import QuantRows  # noqa: E402
from lowvram.model import layers  # noqa: E402
from lowvram.model.attention import sdpa  # noqa: E402
from lowvram.model.rope import RopeTable, grid_positions  # noqa: E402
from lowvram.quantize import backends, fuse  # noqa: E402
from lowvram.quantize.linear import QuantLinear, set_gemm_backend  # noqa: E402

BF = torch.bfloat16
on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def qlinear(k, n, scheme, seed, backend):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen(seed)) * k ** -0.5)
        lin.bias.copy_(torch.randn(n, generator=gen(seed + 1)))
    m = QuantLinear.from_linear(lin.to(BF), scheme)
    m.backend = backend
    return m


def count_calls(monkeypatch, module, name, calls):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))


def cpu_scaled_mm():
    return backends._REGISTRY["scaled_mm"].supports(torch.empty(1, 16), torch.empty(16, 16, dtype=torch.float8_e4m3fn))


@on_cpu
@pytest.mark.parametrize("scheme,backend", [("int8", "triton"), ("fp8", "triton"), ("int8", "int_mm"),
                                            ("fp8", "scaled_mm")])
def test_layers_sharing_one_quantized_input_give_its_bits(scheme, backend):
    if backend == "scaled_mm" and not cpu_scaled_mm():
        pytest.skip("no CPU _scaled_mm in this torch")
    qkv = [qlinear(96, n, scheme, n, backend) for n in (96, 37, 40)]
    x = (torch.randn(2, 17, 96, generator=gen(2)) * 3).to(BF)
    assert fuse.input_scheme(x, qkv) == scheme
    xr = fuse.shared(x, qkv)
    assert isinstance(xr, QuantRows) and xr.shape == (2, 17, 96) and fuse.shared(xr, qkv) is xr
    for m in qkv:
        y = m(xr)
        assert y.shape == (2, 17, m.out_features) and torch.equal(y, m(x))
    # the kernel and the torch functions quantize alike
    a, b = fuse.quantize_input(x, scheme == "fp8", "triton"), fuse.quantize_input(x, scheme == "fp8", "torch")
    assert torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8)) and torch.equal(a.scale, b.scale)


def test_no_sharing_where_it_would_change_the_bits():
    x = torch.randn(5, 16, generator=gen(3))
    auto = [QuantLinear.from_linear(nn.Linear(16, 8), "int8") for _ in range(3)]
    assert fuse.input_scheme(x, auto) is None and fuse.shared(x, auto) is x  # CPU auto: the weight-only reference
    assert fuse.input_scheme(x, [nn.Linear(16, 8)]) is None  # a float layer
    mixed = [qlinear(16, 8, "int8", 1, "int_mm"), qlinear(16, 8, "fp8", 2, "int_mm")]
    assert fuse.input_scheme(x, mixed) is None
    xr = QuantRows.of(x, fp8=False)
    with pytest.raises(ValueError, match="cannot feed"):
        auto[0](xr)  # the reference backend takes no quantized rows
    with pytest.raises(ValueError, match="cannot feed"):
        qlinear(16, 8, "fp8", 4, "triton")(xr)  # another scheme


def ffn_seq(s0, s2, backend="triton", seed=5, hidden=200):
    return nn.Sequential(qlinear(96, hidden, s0, seed, backend), nn.GELU(approximate="tanh"),
                         qlinear(hidden, 96, s2, seed + 2, backend))


@on_cpu
@pytest.mark.parametrize("s0,s2,quantized_in", [("int8", "int8", False), ("fp8", "fp8", True), ("int8", "fp8", True)])
def test_ffn_with_gelu_in_the_first_gemm(s0, s2, quantized_in, monkeypatch):
    monkeypatch.setattr(fuse, "GELU_EPILOGUE", True)
    seq = ffn_seq(s0, s2)
    x = (torch.randn(33, 96, generator=gen(6)) * 2).to(BF)
    calls = []
    count_calls(monkeypatch, gemm, "gelu_linear", calls)
    got = fuse.ffn(seq, QuantRows.of(x, s0 == "fp8") if quantized_in else x)
    want = seq(x)  # ffn.0 -> nn.GELU -> ffn.2, each quantizing its own input
    assert calls == ["gelu_linear"] and got.shape == want.shape == (33, 96)
    # the interpreter's GELU (float64 tanh rounded once) gives torch's CPU GELU bits (all of 10^6 samples tried)
    assert torch.equal(got, want)


@on_cpu
@pytest.mark.parametrize("s0,s2,quantized_in", [("int8", "int8", False), ("fp8", "fp8", True), ("int8", "fp8", True)])
def test_ffn_with_gelu_in_the_second_gemms_quantization(s0, s2, quantized_in, monkeypatch):
    # the default (no epilogue): ffn.0 writes its bf16 hidden, ffn.2's quantization kernel applies the GELU
    seq = ffn_seq(s0, s2)
    x = (torch.randn(33, 96, generator=gen(16)) * 2).to(BF)
    calls = []
    real = gemm.quantize_rows
    monkeypatch.setattr(gemm, "quantize_rows", lambda *a, **k: calls.append(k.get("gelu", False)) or real(*a, **k))
    monkeypatch.setattr(nn.GELU, "forward", lambda *a: pytest.fail("a GELU pass of its own"))
    got = fuse.ffn(seq, QuantRows.of(x, s0 == "fp8") if quantized_in else x)
    monkeypatch.undo()
    want = seq(x)  # ffn.0 -> nn.GELU -> ffn.2, each quantizing its own input
    assert True in calls and got.shape == want.shape == (33, 96)
    assert torch.equal(got, want)  # the interpreter's GELU gives torch's CPU GELU bits


@on_cpu
def test_ffn_falls_back_where_the_epilogue_cannot_run(monkeypatch):
    monkeypatch.setattr(gemm, "gelu_linear", lambda *a, **k: pytest.fail("fused where it must not be"))
    x = torch.randn(7, 96, generator=gen(8)).to(BF)
    real = gemm.quantize_rows
    monkeypatch.setattr(gemm, "quantize_rows", lambda *a, **k: pytest.fail("GELU quantized where it must not be")
                        if k.get("gelu") else real(*a, **k))
    for seq in (ffn_seq("int8", "int8", "int_mm"), ffn_seq("int8", "int8", "auto"),  # not our GEMM
                nn.Sequential(qlinear(96, 200, "int8", 1, "triton"), nn.GELU(), qlinear(200, 96, "int8", 2, "triton"))):
        for epilogue in (True, False):  # neither the GELU in ffn.0's epilogue nor in ffn.2's quantization
            monkeypatch.setattr(fuse, "GELU_EPILOGUE", epilogue)
            assert torch.equal(fuse.ffn(seq, x), seq(x))
    if cpu_scaled_mm():  # FP8 ffn.0 on torch._scaled_mm (K, N multiples of 16): the epilogue would change its bits
        seq = ffn_seq("fp8", "fp8", hidden=208)
        monkeypatch.setitem(gemm.configs.FP8_ENGINE, "interp", "scaled_mm")
        monkeypatch.setattr(fuse, "GELU_EPILOGUE", True)
        assert torch.equal(fuse.ffn(seq, x), seq(x))


# ------------------------------------------------------------------------------------------ a whole Block

def make_block(scheme, device="cpu", dim=96, ffn=200, heads=2, backend="triton"):
    torch.manual_seed(0)
    blk = layers.Block(dim, ffn, heads)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
    blk = blk.to(device, BF)
    for name in LINEARS if scheme else ():
        parent, _, child = name.rpartition(".")
        holder = blk.get_submodule(parent)
        setattr(holder, child, QuantLinear.from_linear(getattr(holder, child), scheme))
    set_gemm_backend(blk, backend)
    return blk


def block_inputs(b, device="cpu", dim=96, heads=2, per_frame=11, frames=3):
    g = gen(11 + b)
    x = torch.randn(b, frames * per_frame, dim, generator=g).to(device, BF)
    e0 = (torch.randn(b, frames, 6, dim, generator=g) * 0.1).to(device)
    ctx = torch.randn(1, 16, dim, generator=g).to(device, BF)
    pos = grid_positions(range(5, 5 + frames), range(per_frame), range(1))
    cos, sin = (t.to(device) for t in RopeTable.build(dim // heads, 1024).gather(pos))
    return x, e0, ctx, (cos, sin), frames


def run(blk, inputs, on):
    x, e0, ctx, rope, frames = inputs
    layers.set_fuse(blk, on)
    with torch.no_grad():
        return blk(x, e0, ctx, sdpa, frames, rope=rope)


@on_cpu
@pytest.mark.slow
@pytest.mark.parametrize("scheme,b,kernels", [("int8", 1, True), ("fp8", 2, False), ("int8", 2, True)])
def test_block_fused_equals_block_unfused(scheme, b, kernels, monkeypatch):
    if kernels:  # the norm kernels too (layer_norm_mod_quant's Triton path), not only the GEMMs
        monkeypatch.setattr(fused, "use_triton", lambda x, backend: backend != "torch")
    monkeypatch.setattr(fuse, "GELU_EPILOGUE", True)  # the epilogue too (off by default: slower on the H200)
    monkeypatch.setattr(layers, "FFN_MIN_ROWS", 0)  # one frame per chunk at this tiny size
    blk, inputs = make_block(scheme), block_inputs(b)
    calls = []
    count_calls(monkeypatch, fused, "layer_norm_mod_quant", calls)
    count_calls(monkeypatch, gemm, "gelu_linear", calls)
    real_add = fused.add_layer_norm_mod  # norm2 after the cross-attention's residual: 8-bit rows when fp8 is given
    monkeypatch.setattr(fused, "add_layer_norm_mod",
                        lambda *a, **k: calls.append("add_quant" if k.get("fp8") is not None else "add") or real_add(*a, **k))
    real_gated = fused.gated_layer_norm_mod  # norm3 after the self-attention's gated residual, the same way
    monkeypatch.setattr(fused, "gated_layer_norm_mod", lambda *a, **k: calls.append(
        "gated_quant" if k.get("fp8") is not None else "gated") or real_gated(*a, **k))
    unfused = run(blk, inputs, False)
    assert calls == ["gated", "add"]
    calls.clear()
    fused_out = run(blk, inputs, True)
    # norm1 -> q/k/v, norm3 (with the gated residual) -> cross_attn.q, norm2 (with the residual) -> ffn.0; the FFN
    # in 3 chunks of one frame
    assert calls.count("layer_norm_mod_quant") == 1 and calls.count("add_quant") == calls.count("gated_quant") == 1
    assert calls.count("gelu_linear") == 3
    assert torch.equal(fused_out, unfused)  # (the interpreter's GELU gives torch's bits, see above)
    # larger FFN chunks (bigger GEMMs) give the same rows
    monkeypatch.setattr(layers, "FFN_CHUNK_FRAMES", 3)
    assert torch.equal(run(blk, inputs, True), unfused) and calls.count("gelu_linear") == 4
    # the default: shared 8-bit inputs, the GELU in ffn.2's quantization
    monkeypatch.setattr(fuse, "GELU_EPILOGUE", False)
    assert torch.equal(run(blk, inputs, True), unfused) and calls.count("gelu_linear") == 4
    assert calls.count("layer_norm_mod_quant") == 3 and calls.count("add_quant") == calls.count("gated_quant") == 3


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=on_cpu),
                                    pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_a_batch_s_attention_outputs_reach_o_unconcatenated(scheme, device, monkeypatch):
    """attend returning the samples' outputs as a list (the DiT's batched call, each sample over its own window):
    o's input is quantized part by part into one buffer (fuse.quantize_parts, no concatenation), and the block's
    output is bit for bit that of attend returning their concatenation. Control: the parts in another order."""
    if device == "cuda" and scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    backend = "triton" if device == "cpu" else "auto"
    blk, (x, e0, ctx, rope, frames) = make_block(scheme, device, backend=backend), block_inputs(3, device)

    def per_sample(q, k, v):
        return [sdpa(q[j:j + 1], k[j:j + 1], v[j:j + 1]) for j in range(q.shape[0])]

    made = []
    real = fuse.quantize_parts
    monkeypatch.setattr(fuse, "quantize_parts", lambda *a: made.append(real(*a)) or made[-1])
    layers.set_fuse(blk, True)
    with torch.no_grad():
        want = blk(x, e0, ctx, lambda *a: torch.cat(per_sample(*a)), frames, rope=rope)
        assert made == []
        got = blk(x, e0, ctx, per_sample, frames, rope=rope)
        assert len(made) == 1 and isinstance(made[0], QuantRows) and made[0].q.shape == (3 * 33, 96)
        assert torch.equal(got, want)
        swapped = blk(x, e0, ctx, lambda *a: per_sample(*a)[::-1], frames, rope=rope)
        assert not torch.equal(swapped, want)
        layers.set_fuse(blk, False)  # unfused: the list is concatenated, the same values
        assert torch.equal(blk(x, e0, ctx, per_sample, frames, rope=rope), blk(x, e0, ctx, lambda *a: torch.cat(
            per_sample(*a)), frames, rope=rope)) and len(made) == 2  # (the swapped call made the second)


def test_quantize_rows_into_given_rows():
    """gemm.quantize_rows(out=) writes rows of larger buffers with the bits of a fresh call; a wrong buffer is
    refused."""
    x = torch.randn(20, 96, generator=gen(8)).to(BF)
    for fp8 in (False, True):
        q0, s0 = gemm.quantize_rows(x, fp8=fp8)
        q = torch.zeros(30, 96, dtype=q0.dtype)
        s = torch.zeros(30)
        gemm.quantize_rows(x, fp8=fp8, out=(q[5:25], s[5:25]))
        assert torch.equal(q[5:25].view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s[5:25], s0)
        assert not q[:5].view(torch.uint8).any() and not s[25:].any()
    with pytest.raises(ValueError, match="out="):
        gemm.quantize_rows(x, out=(torch.empty(20, 96, dtype=torch.float8_e4m3fn), torch.empty(20)))


@on_cpu
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_audio_injector_norm_writes_q_input(scheme, monkeypatch):
    """The audio injector's AdaLN (fused.ada_layer_norm, the kernel under the interpreter) writes its W8A8 q's
    8-bit rows when the injector fuses: the same output bits as q quantizing the norm's bf16 rows itself."""
    from lowvram.model.audio import AudioInjector

    monkeypatch.setattr(fused, "use_triton", lambda x, backend: backend != "torch")
    torch.manual_seed(1)
    dim, heads, b, f, tokens = 96, 2, 2, 3, 11
    inj = AudioInjector(dim, heads, [0])
    with torch.no_grad():
        for prm in inj.parameters():
            prm.copy_(torch.randn_like(prm) * prm.shape[-1] ** -0.5 if prm.ndim > 1 else 1 + 0.1 * torch.randn_like(prm))
    inj = inj.to(BF)
    inj.injector[0].q = QuantLinear.from_linear(inj.injector[0].q, scheme)
    set_gemm_backend(inj, "triton")
    g = gen(5)
    x = torch.randn(b, f * tokens, dim, generator=g).to(BF)
    loc, glob = (torch.randn(b, f, n, dim, generator=g).to(BF) for n in (5, 1))
    seen = []
    real = fused.ada_layer_norm
    monkeypatch.setattr(fused, "ada_layer_norm", lambda *a, **k: seen.append(k.get("fp8")) or real(*a, **k))
    with torch.no_grad():
        layers.set_fuse(inj, False)
        unfused = inj(0, x, loc, glob)
        layers.set_fuse(inj, True)
        fused_out = inj(0, x, loc, glob)
    assert seen == [None, scheme == "fp8"]
    assert torch.equal(fused_out, unfused) and (fused_out - x).abs().max() > 0  # it injected something


def test_cpu_auto_blocks_run_the_unfused_path(monkeypatch):
    # fp32 nn.Linear and auto-backend QuantLinear blocks on the CPU: nothing is shared, today's values exactly
    monkeypatch.setattr(fused, "layer_norm_mod_quant", lambda *a, **k: pytest.fail("fused on the CPU"))
    monkeypatch.setattr(gemm, "gelu_linear", lambda *a, **k: pytest.fail("fused on the CPU"))
    for scheme in (None, "int8"):
        blk = make_block(scheme, backend="auto").float()
        x, e0, ctx, rope, frames = block_inputs(1)
        inputs = (x.float(), e0, ctx.float(), rope, frames)
        assert torch.equal(run(blk, inputs, True), run(blk, inputs, False))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_gpu_block_fused_vs_unfused(scheme):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    blk = make_block(scheme, "cuda", dim=512, ffn=1376, heads=4, backend="auto")
    inputs = block_inputs(2, "cuda", dim=512, heads=4, per_frame=40)
    unfused, fused_out = run(blk, inputs, False), run(blk, inputs, True)
    set_gemm_backend(blk, "reference")
    weight_only = run(blk, inputs, False)
    rel, noise = R.rel_error(fused_out, unfused), R.rel_error(unfused, weight_only)
    assert rel <= noise / 2, (rel, noise)
    assert (fused_out == unfused).float().mean() > 0.5
