"""QuantLinear: the weight quantizer (checked against optimum-quanto), every backend, the module swap."""

import pytest
import torch
import torch.nn as nn

from lowvram.errors import LowvramError
from lowvram.kernels.rowquant import quantize_rows_int8
from lowvram.metrics import sqnr_db
from lowvram.quantize import backends
from lowvram.quantize.linear import (
    QuantLinear,
    apply_quant_layers,
    dequantize_weight,
    quantize_weight,
    set_gemm_backend,
)

# Measured on N(0,1) weights of odd shapes, seeds 0-4: int8 42.5-45.3 dB, fp8 31.1-32.4 dB.
WEIGHT_FLOOR = {"int8": 41.0, "fp8": 30.0}
# Output vs the fp32 linear, N(0,1) activations, 48 -> 40, seeds 0-3: weight-only reference int8 43.5-44.5 dB,
# fp8 32.1-32.7 dB; W8A8 (per-token dynamic activations too) int_mm 41.5-42.5 dB, scaled_mm 29.0-29.3 dB.
OUTPUT_FLOOR = {"int8": 39.0, "fp8": 27.0}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("shape", [(37, 53), (5, 300), (96, 40)])
def test_weight_sqnr_floor_and_scale(scheme, shape):
    w = torch.randn(shape, generator=_gen(sum(shape))).bfloat16()
    q, s = quantize_weight(w, scheme)
    assert q.dtype == (torch.int8 if scheme == "int8" else torch.float8_e4m3fn) and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (shape[0],)
    qmax = 127 if scheme == "int8" else 448
    torch.testing.assert_close(s, w.float().abs().amax(1) / qmax)
    # every row reaches the top code exactly once its absmax is mapped there
    torch.testing.assert_close(q.float().abs().amax(1), torch.full((shape[0],), float(qmax)))
    assert sqnr_db(w.float(), dequantize_weight(q, s)) >= WEIGHT_FLOOR[scheme]
    if scheme == "int8":  # round-to-nearest: each element is within half a step
        err = (dequantize_weight(q, s) - w.float()).abs()
        assert (err <= s[:, None] * 0.5 * (1 + 1e-5)).all()


def test_int8_agrees_with_optimum_quanto():
    quanto = pytest.importorskip("optimum.quanto")
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer

    qint8, quanto_quantize = quanto.qint8, quanto.quantize_weight
    w = (torch.randn(77, 61, generator=_gen(7)) * torch.linspace(0.1, 3, 77)[:, None]).bfloat16()
    q, s = quantize_weight(w, "int8")
    w32 = w.float()
    ref = quanto_quantize(w32, qtype=qint8, axis=0, scale=AbsmaxOptimizer()(w32, qint8, axis=0))
    ref_q, ref_s = ref._data, ref._scale.reshape(-1)
    torch.testing.assert_close(s, ref_s.float(), rtol=1e-6, atol=0)
    assert (q.int() - ref_q.int()).abs().max().item() <= 1  # within one quantization step
    assert (q == ref_q).float().mean().item() > 0.99
    torch.testing.assert_close(dequantize_weight(q, s), ref.dequantize().float(), rtol=0, atol=s.max().item())


def test_zero_rows_quantize_to_zero():
    w = torch.randn(6, 9, generator=_gen(1))
    w[2] = 0
    for scheme in ("int8", "fp8"):
        q, s = quantize_weight(w, scheme)
        assert torch.isfinite(s).all() and (q[2].float() == 0).all()


def _reference_out(x, lin):
    return nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())


@pytest.mark.parametrize("scheme,backend", [("int8", "reference"), ("int8", "int_mm"), ("fp8", "reference"),
                                            ("fp8", "scaled_mm")])
def test_backends_match_the_float_linear(scheme, backend):
    if backend == "scaled_mm" and not backends._REGISTRY["scaled_mm"].supports(
            torch.empty(1, 16), torch.empty(16, 16, dtype=torch.float8_e4m3fn)):
        pytest.skip("no FP8 matmul here")
    g = _gen(11)
    lin = nn.Linear(48, 40, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g) / 48 ** 0.5)
        lin.bias.copy_(torch.randn(40, generator=g) * 0.1)
    lin = lin.bfloat16()
    ql = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(3, 7, 48, generator=g).bfloat16()  # [B, L, in], M = 21
    assert set_gemm_backend(ql, backend) == 1 and ql.backend == backend
    y = ql(x)
    assert y.shape == (3, 7, 40) and y.dtype == torch.bfloat16
    assert backends.resolve(x.reshape(-1, 48), ql.qweight, ql.backend).name == backend
    assert sqnr_db(_reference_out(x, lin), y) >= OUTPUT_FLOOR[scheme]
    # an explicit backend per call gives the same answer as the module's choice
    torch.testing.assert_close(ql(x, backend=backend), y, rtol=0, atol=0)


def test_gemm_backend_is_per_module():
    # set_gemm_backend sets every QuantLinear of one model and leaves other models alone
    a = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    b = nn.Sequential(nn.Linear(16, 8))
    apply_quant_layers(a, {"0": "int8", "2": "int8"})
    apply_quant_layers(b, {"0": "int8"})
    assert a[0].backend == "auto" and "backend" not in dict(a.named_buffers())
    assert set_gemm_backend(a, "int_mm") == 2 and set_gemm_backend(nn.GELU(), "reference") == 0
    assert a[0].backend == a[2].backend == "int_mm" and b[0].backend == "auto"


def test_w8a8_matches_dequantized_math():
    """int_mm equals the same math done in float: q_x q_w^T * s_x s_w + b."""
    g = _gen(5)
    ql = QuantLinear.from_linear(nn.Linear(24, 16).bfloat16(), "int8")
    x = torch.randn(19, 24, generator=g).bfloat16()
    xq, xs = quantize_rows_int8(x)
    want = (xq.float() @ ql.qweight.float().t()) * xs[:, None] * ql.scale[None, :] + ql.bias.float()
    torch.testing.assert_close(ql(x, backend="int_mm").float(), want.bfloat16().float(), rtol=0, atol=0)


def test_auto_and_fallback_choices():
    x = torch.randn(4, 16, generator=_gen(2))
    w8 = torch.zeros(16, 16, dtype=torch.int8)
    assert backends.resolve(x, w8).name == "reference"  # CPU -> reference
    assert backends.resolve(x, w8, "scaled_mm").name == "reference"  # wrong scheme -> reference
    ql = QuantLinear.from_linear(nn.Linear(16, 8), "int8")
    with pytest.raises(LowvramError, match="unknown or unavailable") as err:
        set_gemm_backend(ql, "fastest")
    assert ql.backend == "auto"
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in ["auto", *backends.available_backends()])


def test_triton_backend_plugs_in_when_the_kernels_import(monkeypatch):
    from lowvram.kernels import gemm

    if gemm.triton is None:
        pytest.skip("Triton is not installed")
    calls = []
    for tag in ("int8", "fp8"):
        monkeypatch.setattr(gemm, f"{tag}_linear",
                            lambda x, q, s, b, tag=tag: calls.append(tag) or backends.reference_linear(x, q, s, b))
    assert "triton" in backends.available_backends()
    ql = QuantLinear.from_linear(nn.Linear(16, 8).bfloat16(), "int8")
    x = torch.randn(5, 16, generator=_gen(3)).bfloat16()
    # where the kernels cannot run (a CPU without the interpreter) the triton backend declines, the reference runs
    monkeypatch.setattr(gemm, "triton_usable", lambda x: False)
    assert backends.resolve(x, ql.qweight, "triton").name == "reference"
    # where they can (CUDA, or the CPU under the interpreter) it runs when named; auto keeps the CPU's reference
    monkeypatch.setattr(gemm, "triton_usable", lambda x: True)
    assert backends.resolve(x, ql.qweight).name == "reference"
    b = backends.resolve(x, ql.qweight, "triton")
    assert b.name == "triton"
    b.fn(x, ql.qweight, ql.scale, ql.bias)
    assert calls == ["int8"]


def test_without_triton_the_backend_is_refused_with_the_reason(monkeypatch):
    from lowvram.kernels import gemm

    monkeypatch.setattr(backends, "_REGISTRY", {k: v for k, v in backends._REGISTRY.items() if k != "triton"})
    monkeypatch.setattr(gemm, "TRITON_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(LowvramError, match="unavailable quantized-matmul backend 'triton' .ModuleNotFoundError"):
        set_gemm_backend(QuantLinear.from_linear(nn.Linear(16, 8), "int8"), "triton")
    x = torch.randn(4, 16, generator=_gen(2))
    assert backends.resolve(x, torch.zeros(16, 16, dtype=torch.int8), "triton").name == "reference"


def test_apply_quant_layers_on_meta_then_assign():
    g = _gen(9)
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(12, 20), nn.GELU(approximate="tanh"), nn.Linear(20, 12, bias=False)).bfloat16()
    q0, q2 = QuantLinear.from_linear(src[0], "int8"), QuantLinear.from_linear(src[2], "fp8")
    sd = {"0.qweight": q0.qweight, "0.scale": q0.scale, "0.bias": q0.bias, "2.qweight": q2.qweight,
          "2.scale": q2.scale}
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 20), nn.GELU(approximate="tanh"), nn.Linear(20, 12, bias=False))
    model = model.bfloat16()
    apply_quant_layers(model, {"0": "int8", "2": "fp8"})
    assert model[0].qweight.is_meta and model[0].qweight.dtype == torch.int8
    assert model[2].qweight.dtype == torch.float8_e4m3fn and model[2].bias is None
    model.load_state_dict(sd, assign=True, strict=True)
    assert model[0].qweight.data_ptr() == q0.qweight.data_ptr()  # assigned, not copied
    x = torch.randn(2, 9, 12, generator=g).bfloat16()
    assert sqnr_db(src(x).float(), model(x).float()) >= 28.0
    with pytest.raises(LowvramError, match="does not have"):
        apply_quant_layers(model, {"5": "int8"})
    with pytest.raises(LowvramError, match="not a Linear"):
        apply_quant_layers(model, {"1": "int8"})
    with pytest.raises(LowvramError, match="unknown quantization scheme"):
        quantize_weight(torch.randn(3, 3, generator=g), "int4")


def test_sqnr_db():
    x = torch.randn(1000, generator=_gen(4))
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise = 0.1 x
    assert sqnr_db(x, x + 0.01 * x.flip(0), chunk=7) == pytest.approx(40.0, abs=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("m", [5, 33, 1000])
def test_cuda_backends_agree_with_reference(scheme, m):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    g = torch.Generator(device="cuda").manual_seed(m)
    lin = nn.Linear(256, 384, device="cuda").bfloat16()
    ql = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(m, 256, generator=g, device="cuda").bfloat16()
    want = _reference_out(x, lin)
    assert backends.resolve(x, ql.qweight).name == "triton"  # auto on CUDA: the fused kernels
    for name in ("auto", {"int8": "int_mm", "fp8": "scaled_mm"}[scheme]):
        y = ql(x, backend=name)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 384)
        assert sqnr_db(want, y) >= OUTPUT_FLOOR[scheme], name
        assert sqnr_db(ql(x, backend="reference").float(), y.float()) >= OUTPUT_FLOOR[scheme], name
