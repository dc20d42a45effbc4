"""W8A8 GEMMs: per-token activation quantization + an 8-bit tensor-core GEMM with scales and bias fused.

Algorithm: (1) `quantize_rows`: one program per row of x [M, K] (bf16) finds absmax, writes the
8-bit row and its fp32 scale by kernels/rowquant.py's rule (INT8 absmax/127, FP8 e4m3 absmax/448,
ties to even; bit-identical to rowquant's torch functions); one read of x, one write of the 8-bit copy.
(2) `_w8a8_gemm`: C = (Xq Wq^T) * x_scale[:, None] * w_scale[None, :] + bias, tiles grouped along
M for L2 reuse, int32 (INT8) or fp32 (FP8) accumulation, the scales and bias applied in the
epilogue, bf16 out. The weight stays [N, K] (K contiguous), which is the K-major operand layout
8-bit tensor cores want.
Limits: x is 2-D with a contiguous last dim; FP8 needs sm_89+. FP8 can instead go through cuBLAS
(`torch._scaled_mm`, row-wise) after our quantization kernel (configs.FP8_ENGINE says which engine runs where).
Quantize once, feed many: `w8a8_linear` runs the GEMM on rows quantized already (rowquant.QuantRows, e.g. one
copy for q, k and v, or written by kernels/fused.py's norm); `gelu_linear` is the FFN's first GEMM with
tanh-GELU in its epilogue and each row's absmax of the result accumulated by atomic max, so that the second
GEMM's quantization is one pass (`quantize_rows(g, amax=...)`).
"""

from __future__ import annotations

import torch

from lowvram.kernels import configs
from lowvram.kernels.reference import fp8_linear_reference, int8_linear_reference
from lowvram.kernels.rowquant import FP8_MAX, INT8_MAX

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from lowvram.kernels.rowquant import _INTERPRETED, round_8bit, scale_of

    TRITON_ERROR = None
except ImportError as e:  # CPU-only installs: the torch references serve
    triton = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"  # why, for the GEMM backend's error message

GELU_BETA = 0.7978845608028654  # sqrt(2 / pi), torch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5 (the same fp32)
GELU_KAPPA = 0.044715

if triton is not None:
    _BETA = tl.constexpr(GELU_BETA)  # (a jit function reads only constexpr globals)
    _KAPPA = tl.constexpr(GELU_KAPPA)

    @triton.jit
    def _tanh(u):
        if _INTERPRETED:  # no libdevice on the CPU: exp in float64, rounded once to fp32 (|u| > 20: exactly
            # +-1 in fp32 either way, and no overflow)
            e = tl.exp(2.0 * tl.minimum(tl.maximum(u.to(tl.float64), -20.0), 20.0))
            t = (1.0 - 2.0 / (e + 1.0)).to(tl.float32)
        else:
            t = libdevice.tanh(u)  # __nv_tanhf; torch's CUDA GELU calls tanhf
        return t

    @triton.jit
    def _gelu_tanh(x):
        # nn.GELU(approximate="tanh") in fp32, torch's expression order: 0.5 x (1 + tanh(beta (x + kappa x^3)))
        inner = _BETA * (x + _KAPPA * (x * x * x))
        return 0.5 * x * (1.0 + _tanh(inner))

    @triton.jit
    def _bf16_rne(y):
        # fp32 -> bf16 rounded to nearest, ties to even, as torch rounds; the interpreter's own cast truncates,
        # so there the bits are rounded first (the carry may run into the exponent: that is the rounding too)
        if _INTERPRETED:
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            y = bits.to(tl.float32, bitcast=True)
        return y.to(tl.bfloat16)

    @triton.jit
    def _gelu_sigmoid(x):
        # the same function as _gelu_tanh through 0.5 (1 + tanh(u)) = sigmoid(2u): x / (1 + 2^(-2 u log2 e)), one
        # exp2 and one division; accurate to a few fp32 ulps everywhere (no cancellation as tanh -> -1; x << 0:
        # 2^(+big) = inf, x / inf = -0), where libdevice's tanhf is a branchy polynomial the kernel pays per element
        inner = _BETA * (x + _KAPPA * (x * x * x))
        return x / (1.0 + tl.exp2(inner * -2.885390081777927))

    @triton.jit
    def _gelu_bf16(x, GELU: tl.constexpr):
        # GELU "tanh": nn.GELU(approximate="tanh") of bf16 values x (in fp32) by torch's expression, "sigmoid": by the
        # sigmoid form (configs.GELU_FORM); rounded to bf16 as torch's GELU rounds; None: x
        if GELU == "tanh":
            x = _bf16_rne(_gelu_tanh(x)).to(tl.float32)
        elif GELU == "sigmoid":
            x = _bf16_rne(_gelu_sigmoid(x)).to(tl.float32)
        return x

    @triton.jit
    def _quant_rows(X, Q, S, AMAX, K, stride_x, stride_q, QMAX: tl.constexpr, FP8: tl.constexpr,
                    BLOCK: tl.constexpr, SINGLE: tl.constexpr, GIVEN: tl.constexpr, GELU: tl.constexpr):
        # SINGLE: the whole row fits one block and is read once; GIVEN: each row's absmax is given (AMAX [M]),
        # one pass of BLOCK columns; else two passes (absmax, quantize); GELU: the rows quantized are GELU(X)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            mask = cols < K
            x = _gelu_bf16(tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32), GELU)
            scale, inv = scale_of(tl.max(tl.abs(x), 0), QMAX)
            tl.store(Q + row * stride_q + cols, round_8bit(x * inv, QMAX, FP8, Q.dtype.element_ty), mask=mask)
        else:
            if GIVEN:
                amax = tl.load(AMAX + row)
            else:
                acc = tl.zeros([BLOCK], tl.float32)
                for start in range(0, K, BLOCK):
                    x = tl.load(X + row * stride_x + start + cols, mask=start + cols < K, other=0.0)
                    acc = tl.maximum(acc, tl.abs(_gelu_bf16(x.to(tl.float32), GELU)))
                amax = tl.max(acc, 0)
            scale, inv = scale_of(amax, QMAX)
            for start in range(0, K, BLOCK):
                mask = start + cols < K
                y = _gelu_bf16(tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32), GELU) * inv
                tl.store(Q + row * stride_q + start + cols, round_8bit(y, QMAX, FP8, Q.dtype.element_ty), mask=mask)
        tl.store(S + row, scale)

    @triton.jit
    def _w8a8_gemm(A, W, C, AS, WS, BIAS, AMAX, M, N, K, stride_am, stride_wn, stride_cm, M_KEY,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EVEN_K: tl.constexpr, INT8: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # A: [M, K] 8-bit, W: [N, K] 8-bit, C: [M, N] bf16; M_KEY (M rounded up to a power of
        # two) is unused here: it is the autotune key, so varying token counts reuse one tuning.
        # GELU: C = GELU(C) and AMAX [M] (zeroed by the caller) = max |C| of each row, by atomic max over N tiles
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * grid_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)  # wrap: loads stay in bounds
        rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptr = A + ram[:, None].to(tl.int64) * stride_am + rk[None, :]
        w_ptr = W + rbn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BK, BN] view of W^T
        if INT8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptr)
                w = tl.load(w_ptr)
            else:
                kk = k * BLOCK_K + rk
                a = tl.load(a_ptr, mask=kk[None, :] < K, other=0.0)
                w = tl.load(w_ptr, mask=kk[:, None] < K, other=0.0)
            if INT8:  # Triton <= 3.6 defaults out_dtype to fp32 even with an int32 accumulator
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, w, acc, out_dtype=tl.float32)
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K
        a_s = tl.load(AS + ram)
        w_s = tl.load(WS + rbn)
        out = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
        if HAS_BIAS:
            out += tl.load(BIAS + rbn).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        out = out.to(C.dtype.element_ty)
        if GELU:  # on the bf16 product, as the unfused GEMM -> bf16 -> nn.GELU; rounded as torch's GELU rounds
            out = _bf16_rne(_gelu_tanh(out.to(tl.float32)))
            row_max = tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), 1)  # [BLOCK_M]
            tl.atomic_max(AMAX + rm, row_max, mask=rm < M, sem="relaxed")  # any order: a max
        c_ptr = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
        tl.store(c_ptr, out, mask=mask)

_TUNED: dict = {}


def _gemm_kernel(family: str):
    if family not in _TUNED:
        cfgs = [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                              num_warps=c["num_warps"], num_stages=c["num_stages"])
                for c in configs.select(configs.GEMM, family)]
        even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_w8a8_gemm)
        _TUNED[family] = triton.autotune(cfgs, key=["M_KEY", "N", "K"])(even_k)
    return _TUNED[family]


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton path can run for tensors on x's device."""
    return triton is not None and (x.is_cuda or configs.interpreter_ready())


def quantize_rows(x: torch.Tensor, fp8: bool = False, single: bool | None = None,
                  amax: torch.Tensor | None = None, gelu: bool = False,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization x [M, K] -> (int8 or float8_e4m3fn [M, K], fp32 scale [M]) in one kernel,
    bit-identical to rowquant.quantize_rows_int8 / quantize_rows_fp8.

    single: read each row once (rows up to configs.QUANT_ROWS["SINGLE_MAX"] columns; the default
    when they fit) or in two passes (any K). amax: each row's max |x| as fp32 [M], known already
    (gelu_linear's): then one pass of BLOCK columns and no reduction (the same bits, given that absmax).
    gelu: quantize nn.GELU(approximate="tanh")(x) of bf16 x instead, computed in the kernel (so the FFN's hidden
    is read once and never written in bf16) in the form configs.GELU_FORM names: "tanh" is torch's expression (the
    interpreter's: torch's CPU bits), "sigmoid" the same function as x * sigmoid(2u), cheaper on the GPU; either
    way an element may differ from torch's CUDA GELU by one bf16 unit where the fp32 results differ in their last
    bits next to a bf16 rounding boundary.
    out: (q [M, K], scale [M]) to write into (rows of larger buffers: fuse.quantize_parts), else new ones."""
    if gelu and (amax is not None or x.dtype != torch.bfloat16):
        raise ValueError("quantize_rows(gelu=True) takes bf16 rows and no given absmax")
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    qdt = torch.float8_e4m3fn if fp8 else torch.int8
    if out is None:
        q = torch.empty(M, K, device=x.device, dtype=qdt)
        s = torch.empty(M, device=x.device, dtype=torch.float32)
    else:
        q, s = out
        if q.shape != (M, K) or q.dtype != qdt or q.stride(-1) != 1 or s.shape != (M,) or s.dtype != torch.float32:
            raise ValueError(f"quantize_rows out= must be ({M}, {K}) {qdt} rows and ({M},) fp32 scales")
    cfg = configs.QUANT_ROWS_INTERP if configs.interpreting() else configs.QUANT_ROWS
    given = amax is not None
    single = False if given else (K <= cfg["SINGLE_MAX"] if single is None else single)
    block = triton.next_power_of_2(K) if single else min(cfg["BLOCK"], triton.next_power_of_2(K))
    warps = cfg["num_warps"] if block <= 8192 else 16  # K 5120: 8 warps 0.054 ms, 16 0.060 (12672 rows, H200)
    form = configs.GELU_FORM["interp" if configs.interpreting() else "gpu"] if gelu else None
    _quant_rows[(M,)](x, q, s, amax if given else s, K, x.stride(0), q.stride(0), QMAX=FP8_MAX if fp8 else INT8_MAX,
                      FP8=fp8, BLOCK=block, SINGLE=single, GIVEN=given, GELU=form, num_warps=warps)
    return q, s


def _gemm(xq, xs, qweight, w_scale, bias, block: dict | None, out=None, amax=None):
    # amax: fp32 [M] zeros -> the GELU epilogue runs and accumulates each row's absmax there
    M, K = xq.shape
    N = qweight.shape[0]
    if out is None:
        out = torch.empty(M, N, device=xq.device, dtype=torch.bfloat16)
    has_bias = bias is not None
    gelu = amax is not None
    int8 = xq.dtype == torch.int8
    # the dummies are w_scale (fp32): the autotuner's cache key holds the tensors' dtypes, so a GELU call
    # and a plain one of the same shape share one tuning (one tile config, hence the same FP8 accumulation)
    args = (xq, qweight, out, xs, w_scale, bias if has_bias else w_scale, amax if gelu else w_scale, M, N, K,
            xq.stride(0), qweight.stride(0), out.stride(0), triton.next_power_of_2(M))
    if block is not None:
        grid = (triton.cdiv(M, block["BLOCK_M"]) * triton.cdiv(N, block["BLOCK_N"]),)
        _w8a8_gemm[grid](*args, HAS_BIAS=has_bias, GELU=gelu, EVEN_K=K % block["BLOCK_K"] == 0, INT8=int8,
                         num_warps=block.get("num_warps", 4), num_stages=block.get("num_stages", 1),
                         **{k: block[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
    else:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        _gemm_kernel(configs.arch_family(xq.device))[grid](*args, HAS_BIAS=has_bias, GELU=gelu, INT8=int8)
    return out


def _check(x, qweight, w_scale):
    if x.dim() != 2 or qweight.dim() != 2 or x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"linear shapes do not match: x {tuple(x.shape)}, weight {tuple(qweight.shape)}")
    if w_scale.shape != (qweight.shape[0],) or w_scale.dtype != torch.float32:
        raise ValueError("w_scale must be fp32 [N], one scale per output channel")


def int8_linear(x, qweight, w_scale, bias=None, backend: str = "auto", block: dict | None = None,
                out: torch.Tensor | None = None):
    """W8A8 INT8 linear: x bf16 [M, K] (or [..., K]), qweight int8 [N, K], w_scale fp32 [N], bias bf16 [N] -> bf16 [M, N].

    Activations are quantized per token inside (absmax/127). backend: "auto" (Triton on CUDA or
    under the interpreter, else the float32 torch reference), "triton", "torch".
    block: a GEMM config dict to bypass autotuning (tests); out: optional bf16 [M, N] to write into.
    """
    return _w8a8(x, qweight, w_scale, bias, backend, out, False,
                 lambda x2, xq, xs, out: _gemm(xq, xs, qweight, w_scale, bias, block, out))


def _w8a8(x, qweight, w_scale, bias, backend, out, fp8: bool, matmul):
    """The body int8_linear and fp8_linear share: [..., K] flattened to [M, K] and back, the torch
    fallback, per-token quantization; matmul(x, xq, xs, out) runs the GEMM."""
    if x.dim() > 2:
        return _w8a8(x.reshape(-1, x.shape[-1]), qweight, w_scale, bias, backend, out, fp8,
                     matmul).reshape(*x.shape[:-1], qweight.shape[0])
    _check(x, qweight, w_scale)
    if backend == "torch" or (backend == "auto" and not triton_usable(x)):
        reference = fp8_linear_reference if fp8 else int8_linear_reference
        res = reference(x, qweight, w_scale, bias, torch.float32, torch.bfloat16)
        return res if out is None else out.copy_(res)
    xq, xs = quantize_rows(x, fp8=fp8)
    return matmul(x, xq, xs, out)


_SCALED_MM_BIAS: dict = {}  # device family -> whether _scaled_mm takes a bias with row-wise scales


def _scaled_mm_rowwise(xq, xs, qweight, w_scale, bias):
    mm = lambda b: torch._scaled_mm(xq, qweight.t(), scale_a=xs[:, None], scale_b=w_scale[None, :],  # noqa: E731
                                    bias=b, out_dtype=torch.bfloat16)
    fam = configs.arch_family(xq.device)
    if bias is not None and _SCALED_MM_BIAS.get(fam, True):
        try:
            y = mm(bias)
            _SCALED_MM_BIAS[fam] = True
            return y
        except RuntimeError:  # some torch builds refuse a bias with row-wise scales: add it after
            _SCALED_MM_BIAS[fam] = False
    y = mm(None)
    return y if bias is None else y.add_(bias)


def fp8_engine(xq: torch.Tensor, qweight: torch.Tensor, engine: str | None = None) -> str:
    """The engine an FP8 GEMM of xq [M, K] by qweight [N, K] runs on: `engine`, else configs.FP8_ENGINE's for
    the device; "triton" where torch._scaled_mm cannot (K or N not divisible by 16; our GEMM masks any shape)."""
    how = engine or configs.FP8_ENGINE[configs.arch_family(xq.device)]
    return "triton" if xq.shape[1] % 16 or qweight.shape[0] % 16 else how


def fp8_linear(x, qweight, w_scale, bias=None, backend: str = "auto", engine: str | None = None,
               block: dict | None = None, out: torch.Tensor | None = None):
    """FP8 W8A8 linear: x bf16 [M, K], qweight float8_e4m3fn [N, K], w_scale fp32 [N], bias -> bf16 [M, N].

    Activations are quantized per token inside (absmax/448, e4m3). engine: "triton" (our GEMM)
    or "scaled_mm" (torch._scaled_mm row-wise after our quantization kernel); None picks the
    device's faster one from configs.FP8_ENGINE. backend, block, out: as int8_linear.
    """
    return _w8a8(x, qweight, w_scale, bias, backend, out, True,
                 lambda x2, xq, xs, out: w8a8_linear(xq, xs, qweight, w_scale, bias, engine, block, out))


def w8a8_linear(xq, xs, qweight, w_scale, bias=None, engine: str | None = None, block: dict | None = None,
                out: torch.Tensor | None = None):
    """The GEMM of int8_linear / fp8_linear on rows quantized already: xq [M, K] int8 or float8_e4m3fn (as
    qweight [N, K]) and xs fp32 [M] by rowquant's rule -> bf16 [M, N]. The same kernels as those functions after
    their quantization, so the same bits as they give for the x that (xq, xs) came from.
    engine (FP8): as fp8_linear; block, out: as int8_linear."""
    _check(xq, qweight, w_scale)
    if xq.dtype != qweight.dtype or xs.shape != (xq.shape[0],):
        raise ValueError(f"quantized rows {xq.dtype} [{xq.shape[0]}] scales {tuple(xs.shape)} do not fit a "
                         f"{qweight.dtype} weight")
    if xq.dtype == torch.float8_e4m3fn and fp8_engine(xq, qweight, engine) == "scaled_mm":
        y = _scaled_mm_rowwise(xq, xs, qweight, w_scale, bias)
        return y if out is None else out.copy_(y)
    return _gemm(xq, xs, qweight, w_scale, bias, block, out)


def gelu_linear(xq, xs, qweight, w_scale, bias=None, block: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN's first GEMM with its nn.GELU(approximate="tanh") in the epilogue, on quantized rows xq [M, K], xs [M]:
    -> (g bf16 [M, N], amax fp32 [M]) with g = GELU(the bf16 GEMM output w8a8_linear gives) and amax = max |g|
    of each row, accumulated across the N tiles by atomic max, for the next GEMM's one-pass quantization
    (quantize_rows(g, amax=amax)).

    GELU runs in fp32 in torch's expression order, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), and is
    rounded to nearest as torch rounds; the tanh is libdevice's (torch's CUDA kernel calls tanhf; under the
    interpreter a float64 exp), so an element may differ from the unfused GEMM -> nn.GELU by one bf16 unit
    where the two tanh differ in their last fp32 bits near a bf16 rounding boundary (tests bound it).
    Always our GEMM (for FP8 too, whatever configs.FP8_ENGINE says: callers that want the unfused path's
    bits check fp8_engine first). The overwrite of g and the max are idempotent, so autotuning re-runs are harmless."""
    _check(xq, qweight, w_scale)
    amax = torch.zeros(xq.shape[0], device=xq.device, dtype=torch.float32)
    return _gemm(xq, xs, qweight, w_scale, bias, block, amax=amax), amax


def bench_gemm(M=3168, K=5120, N=5120, fp8=False, device="cuda") -> dict:
    """Median time (ms) and TFLOP/s of int8_linear / fp8_linear at one shape (quantization included)."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=gen)
    w = w.to(torch.float16).to(torch.float8_e4m3fn) if fp8 else w
    ws = torch.rand(N, device=device, generator=gen) * 1e-3
    fn = (lambda: fp8_linear(x, w, ws)) if fp8 else (lambda: int8_linear(x, w, ws))  # noqa: E731
    ms = triton.testing.do_bench(fn, warmup=100, rep=300, return_mode="median")
    return {"ms": ms, "tflops": 2.0 * M * N * K / ms / 1e9}
