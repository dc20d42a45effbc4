"""The one per-row 8-bit quantizer (kernels/rowquant.py): its rule, and every Triton path bit-identical to it.

The Triton paths: kernels/gemm.py's quantization kernel (INT8 and FP8, rows read once or in two passes) and
rowquant.quantize_tile, which the 8-bit attention kernel runs on its Q tiles. CPU: Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported). GPU: `-m cuda` compares the compiled kernels, and the
torch functions on the GPU with the same functions on the CPU (torch's CUDA division by a Python number is
a multiply by its reciprocal, which once made the CUDA scales differ; tools/check_rowquant_gpu.py shows each
step when anything differs).
"""

import os

if not __import__("torch").cuda.is_available():  # on a GPU the cuda-marked tests run the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowvram.kernels import gemm  # noqa: E402
from lowvram.kernels import rowquant as RQ  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402

on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def e4m3_midpoints() -> torch.Tensor:
    """Every midpoint between neighbouring non-negative finite e4m3 values (ties of the FP8 rounding)."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[torch.isfinite(v) & (v >= 0)].unique().sort().values
    return (v[1:] + v[:-1]) / 2


def tricky_rows(seed, M, K, fp8, device="cpu"):
    """bf16 [M, K]: rows of random magnitudes (1e-3 .. 1e3), rows whose values sit exactly on rounding ties
    (absmax QMAX * 2^j makes the scale 2^j and its reciprocal exact), an all-zero row, a row below the
    scale floor, a row with -0.0 entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[torch.randperm(M, generator=g)][:, None]
    qmax = RQ.FP8_MAX if fp8 else RQ.INT8_MAX
    if fp8:
        mids = e4m3_midpoints()
        ties = mids[torch.randint(0, mids.numel(), (K,), generator=g)]
    else:
        ties = torch.randint(0, 127, (K,), generator=g) + 0.5  # 0.5 .. 126.5
    ties = ties * torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0)
    for r, j in ((1, 0), (2, -3), (3, 5)):
        x[r] = ties[torch.randperm(K, generator=g)] * 2.0 ** j
        x[r, int(torch.randint(0, K, (1,), generator=g))] = -qmax * 2.0 ** j
    x[0] = 0.0
    x[4] = torch.randn(K, generator=g) * 1e-30  # amax / QMAX below SCALE_FLOOR
    x[5, ::3] = -0.0
    return x.bfloat16().to(device)


def activations(seed, M, K, device="cpu"):
    """bf16 [M, K] like a linear layer's input: N(0, 1) with 3 outlier channels x20 (tests/test_kernels_gemm.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:3]] *= 20.0
    return x.bfloat16().to(device)


def assert_bit_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


def test_the_rule_ties_to_even_and_the_floor():
    q, s = RQ.quantize_rows_int8(torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5], [0.0] * 7]))
    assert q[0].tolist() == [127, 2, -4, 0, 0, 2, -126] and s[0] == 1.0
    assert (q[1] == 0).all() and s[1] == RQ.SCALE_FLOOR
    x = torch.tensor([[448.0, 1.0625, 1.1875, 272.0, -2.0 ** -10, 1.5 * 2.0 ** -9]])
    q, s = RQ.quantize_rows_fp8(x)
    assert q.float()[0].tolist() == [448.0, 1.0, 1.25, 256.0, 0.0, 2.0 ** -8] and s[0] == 1.0
    assert q.view(torch.uint8)[0, 4] == 0x80  # -0.0 keeps its sign, as torch's cast does


@pytest.mark.parametrize("fp8", [False, True])
def test_scale_is_the_correctly_rounded_division(fp8):
    # amax / QMAX and 1 / scale each rounded once from the exact quotient (float64 division rounded to fp32
    # is correctly rounded), x * (1 / scale) one fp32 product: not amax * fl(1 / QMAX), which torch computes
    # on CUDA for a Python-number divisor and which differs for 5 % (/127) or half (/448) of all rows
    x = torch.randn(4000, 33, generator=torch.Generator().manual_seed(5)) * torch.logspace(-8, 8, 4000)[:, None]
    qmax = RQ.FP8_MAX if fp8 else RQ.INT8_MAX
    y, s = RQ._scaled(x, qmax)
    amax = x.abs().amax(-1)
    assert torch.equal(s, (amax.double() / qmax).float())
    assert (s != amax * torch.tensor(1 / qmax)).float().mean() > 0.02  # the two roundings do differ
    inv = (1 / s.double()).float()
    assert torch.equal(y, (x.double() * inv.double()[:, None]).float().clamp(-qmax, qmax))


@pytest.mark.parametrize("fp8", [False, True])
def test_rows_of_any_rank_and_roundtrip(fp8):
    x = torch.randn(3, 5, 2, 33, generator=torch.Generator().manual_seed(7)) * 4
    q, s = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(x)
    flat_q, flat_s = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(x.reshape(-1, 33))
    assert s.shape == (3, 5, 2) and torch.equal(s.reshape(-1), flat_s)
    assert_bit_equal(q.reshape(-1, 33), flat_q)
    back = RQ.dequantize_rows(q, s)
    step = s[..., None] * (1.0 if not fp8 else 32.0)  # e4m3 near 448 steps by 32 / 448 of the absmax
    assert ((back - x).abs() <= step / 2 * (1 + 1e-6)).all()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    assert RQ.dequantize_rows(q, s, out=out) is out and torch.equal(out, back.bfloat16())


@on_cpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("M,K", [(37, 200), (6, 129)])
def test_gemm_quantization_kernel_is_bit_identical(fp8, single, M, K):
    x = tricky_rows(M * K + fp8, M, K, fp8)
    q, s = gemm.quantize_rows(x, fp8=fp8, single=single)
    qr, sr = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(x)
    assert_bit_equal(q, qr)
    assert torch.equal(s, sr)


@on_cpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gemm_quantization_with_the_absmax_given_is_bit_identical(fp8):
    # gelu_linear's absmax (exact: a max of the stored bf16 values) replaces the kernel's first pass
    x = tricky_rows(29 + fp8, 37, 200, fp8)
    q, s = gemm.quantize_rows(x, fp8=fp8, amax=x.float().abs().amax(1))
    qr, sr = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(x)
    assert_bit_equal(q, qr)
    assert torch.equal(s, sr)


@on_cpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("single", [True, False])
def test_gemm_quantization_of_the_gelu_is_that_of_torchs_gelu(fp8, single):
    # the FFN's hidden quantized with its GELU in the kernel: under the interpreter the kernel's GELU gives torch's
    # CPU GELU bits (tests/test_quantize_fuse.py), so the codes and scales are those of quantizing nn.GELU's output
    x = (torch.randn(37, 200, generator=torch.Generator().manual_seed(31 + fp8)) * 3).bfloat16()
    x[3, :7] = torch.tensor([-30.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0])  # the tails and around zero
    q, s = gemm.quantize_rows(x, fp8=fp8, single=single, gelu=True)
    qr, sr = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(torch.nn.functional.gelu(x, approximate="tanh"))
    assert_bit_equal(q, qr)
    assert torch.equal(s, sr)
    with pytest.raises(ValueError, match="bf16 rows"):
        gemm.quantize_rows(x.float(), fp8=fp8, gelu=True)


def assert_codes_close(q, s, qr, sr, fp8, rows_same, codes_differ):
    """8-bit rows (q, s) against (qr, sr): at least `rows_same` of the rows with the same scale, in those at most
    `codes_differ` of the codes differ, INT8 codes by one step at most."""
    same = s == sr
    assert same.float().mean().item() >= rows_same
    a, b = q[same].float(), qr[same].float()
    assert (a != b).float().mean().item() <= codes_differ
    if not fp8:
        assert (a - b).abs().max().item() <= 1


@on_cpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gemm_quantization_of_the_gelu_in_the_sigmoid_form(fp8, monkeypatch):
    # the GPU's form, x / (1 + 2^(-2u log2 e)): the same function, so the codes are those of torch's GELU but where
    # the fp32 results differ in their last bits next to a bf16 rounding boundary (then by one step at most)
    monkeypatch.setitem(gemm.configs.GELU_FORM, "interp", "sigmoid")
    x = (torch.randn(64, 300, generator=torch.Generator().manual_seed(41 + fp8)) * 3).bfloat16()
    x[5, :7] = torch.tensor([-60.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 60.0])  # 2^(+big) = inf gives -0, not NaN
    q, s = gemm.quantize_rows(x, fp8=fp8, gelu=True)
    qr, sr = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(torch.nn.functional.gelu(x, approximate="tanh"))
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert ((s - sr).abs() <= 2.0 ** -7 * sr).all()
    assert_codes_close(q, s, qr, sr, fp8, rows_same=0.95, codes_differ=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_gpu_quantization_of_the_gelu():
    """On the GPU the kernel's GELU (configs.GELU_FORM, the sigmoid form; measured on the H200 at 12672 x 13824: 0 of
    the INT8 codes and 8e-5 of the FP8 codes differ, every row's scale the same) may differ from torch's in the last
    fp32 bits: a hidden element then moves by one bf16 unit, and the codes of its row only where that element is
    the row's absmax or sits at a rounding tie; bounded here by counting codes that differ, none by more than one
    step."""
    x = (torch.randn(3168, 13824, generator=torch.Generator().manual_seed(7)) * 2).bfloat16().cuda()
    for fp8 in (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,):
        q, s = gemm.quantize_rows(x, fp8=fp8, gelu=True)
        qr, sr = gemm.quantize_rows(torch.nn.functional.gelu(x, approximate="tanh"), fp8=fp8)
        assert (s - sr).abs().max().item() <= 2.0 ** -7 * sr.abs().max().item()
        assert_codes_close(q, s, qr, sr, fp8, rows_same=0.999, codes_differ=1e-4)


def test_quant_rows_of_any_rank_and_split():
    x = tricky_rows(5, 12, 33, False).view(2, 6, 33)
    qr = RQ.QuantRows.of(x, fp8=False)
    q, s = RQ.quantize_rows_int8(x.reshape(12, 33))
    assert qr.shape == (2, 6, 33) and qr.dtype == torch.bfloat16 and qr.scheme == "int8"
    assert_bit_equal(qr.q, q)
    assert torch.equal(qr.scale, s)
    parts = qr.split(5)
    assert [p.shape for p in parts] == [(5, 33), (5, 33), (2, 33)]
    assert_bit_equal(torch.cat([p.q for p in parts]), q)
    assert RQ.QuantRows.of(x, fp8=True).scheme == "fp8"


@triton.jit
def _tiles(X, Q, S, M, K, QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # rowquant.quantize_tile on [BLOCK_M, BLOCK_K] tiles of x [M, K], as the 8-bit attention runs it on Q
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = RQ.quantize_tile(x, QMAX, FP8, Q.dtype.element_ty)
    tl.store(Q + rows[:, None] * K + cols[None, :], q, mask=mask)
    tl.store(S + rows, s, mask=rows < M)


def tile_quantize(x, fp8):
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    _tiles[(triton.cdiv(M, 16),)](x, q, s, M, K, QMAX=RQ.FP8_MAX if fp8 else RQ.INT8_MAX, FP8=fp8, BLOCK_M=16,
                                   BLOCK_K=triton.next_power_of_2(K))
    return q, s


@on_cpu
@pytest.mark.parametrize("fp8", [False, True])
def test_attention_q_tile_quantization_is_bit_identical(fp8):
    # 37 rows: the last tile's rows past 37 are zero rows (the kernel's padding) and are not stored
    x = tricky_rows(11 + fp8, 37, 100, fp8)
    q, s = tile_quantize(x, fp8)
    qr, sr = (RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8)(x)
    assert_bit_equal(q, qr)
    assert torch.equal(s, sr)


@pytest.mark.cuda
@needs_cuda
def test_gpu_paths_are_bit_identical():
    """On the GPU: the torch functions give the CPU's bits, and every Triton path gives theirs."""
    for fp8 in (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,):
        quantize = RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8
        for x in (tricky_rows(3, 333, 5120, fp8, device="cuda"), activations(4, 3168, 5120, device="cuda")):
            qr, sr = quantize(x)
            qc, sc = quantize(x.cpu())
            assert torch.equal(sr.cpu(), sc)
            assert_bit_equal(qr.cpu(), qc)
            for single in (True, False):
                q, s = gemm.quantize_rows(x, fp8=fp8, single=single)
                assert_bit_equal(q, qr)
                assert torch.equal(s, sr)
            q, s = tile_quantize(x[:, :256].contiguous(), fp8)
            qr, sr = quantize(x[:, :256])
            assert_bit_equal(q, qr)
            assert torch.equal(s, sr)
