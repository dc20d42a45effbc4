"""The fused kernels' new variants (the gated residual's norm, the AdaLayerNorm's) and the KV caches'
(kernels/kvquant.py) compile for sm_90, the 8-bit attention's cache writer also for the RTX 40's sm_89 and the RTX 30's
sm_86, the AdaLayerNorm's also for sm_89 (TTIR -> PTX -> cubin with Triton's own ptxas), no GPU needed.

Triton's interpreter accepts what the compiler refuses (a non-constexpr global read inside a kernel, for one), so
the CPU tests alone cannot show that a kernel builds. This compiles in a subprocess without TRITON_INTERPRET
(the test process has it set before triton's import).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowvram.kernels import fused, gemm, kvquant

    target = GPUTarget("cuda", 90, 32)
    gemm_sig = {"A": "*fp8e4nv", "W": "*fp8e4nv", "C": "*bf16", "AS": "*fp32", "WS": "*fp32", "BIAS": "*bf16",
                "AMAX": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_wn": "i32",
                "stride_cm": "i32", "M_KEY": "i32"}
    gemm_c = dict(HAS_BIAS=True, GELU=True, EVEN_K=False, INT8=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    quant_sig = {"X": "*bf16", "Q": "*i8", "S": "*fp32", "AMAX": "*fp32", "K": "i32", "stride_x": "i32",
                 "stride_q": "i32"}
    quant_c = dict(QMAX=127.0, FP8=False, BLOCK=2048, SINGLE=False, GIVEN=False, GELU="sigmoid")
    ln_sig = {"X": "*fp32", "W": "*fp32", "B": "*fp32", "SHIFT": "*fp32", "SCALE": "*fp32", "O": "*bf16",
              "Q": "*fp8e4nv", "S": "*fp32", "sx": "i32", "so": "i32", "C": "i32", "rows_per_frame": "i32",
              "eps": "fp32", "Y": "*bf16", "XS": "*fp32", "sy": "i32", "G": "*fp32"}
    ln_c = dict(BLOCK=8192, ROUND_IN=False, AFFINE=False, MOD=True, STORE_H=False, QUANT=True, QMAX=448.0, FP8=True, ADD=True,
                ROUND_H=True, ONE_PLUS=True, GATE=False)
    strides = lambda *names: {n: "i32" for n in names}  # noqa: E731
    kvd_sig = {"q": "*i8", "s": "*fp32", "o": "*bf16", **strides("sqn", "sqt", "ssn", "sst", "son", "sot")}
    heads = dict(H=40, D=128, HB=64, DB=128)
    kvt_sig = {"x": "*bf16", "q": "*i8", "s": "*fp32", "mean": "*fp32", "n": "i32",
               **strides("sxb", "sxt", "sxh", "sxd", "sqb", "sqt", "sqh", "sqd", "ssb", "sst", "ssh")}
    kvt_c = dict(H=40, D=128, DB=128, TB=32, MEAN=True, QMAX=127.0)
    for fn, sig, consts in ((gemm._w8a8_gemm, gemm_sig, gemm_c), (gemm._quant_rows, quant_sig, quant_c),
                            (fused._ln_mod_kernel, ln_sig, ln_c),
                            (kvquant._dequant_heads, kvd_sig, heads), (kvquant._quant_tokens, kvt_sig, kvt_c)):
        sig = dict(sig, **{k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                           options={"num_warps": 4, "num_stages": 2})
        assert "cubin" in k.asm, fn
    # the audio injector's AdaLayerNorm (fused.ada_layer_norm: bf16 rows, the norm kept in fp32, the factor given
    # whole, the q's 8-bit rows out) runs on every card: sm_90, and the RTX 40's sm_89 with INT8 rows
    ada_sig = dict(ln_sig, X="*bf16", Q="*i8")
    ada_c = dict(BLOCK=8192, ROUND_IN=False, AFFINE=False, MOD=True, STORE_H=False, QUANT=True, QMAX=127.0, FP8=False,
                 ADD=False, ROUND_H=False, ONE_PLUS=False)
    # the self-attention's gated residual with norm3 (fused.gated_layer_norm_mod: bf16 x, fp32 sum, affine, FP8 rows)
    gate_sig = dict(ln_sig, X="*bf16", Y="*bf16", XS="*fp32", G="*fp32")
    gate_c = dict(BLOCK=8192, ROUND_IN=True, AFFINE=True, MOD=False, STORE_H=False, QUANT=True, QMAX=448.0, FP8=True,
                  ADD=True, ROUND_H=True, ONE_PLUS=True, GATE=True)
    for arch, sig, consts in ((90, ada_sig, ada_c), (89, ada_sig, ada_c), (90, gate_sig, gate_c)):
        consts = {"GATE": False, **consts}
        k = triton.compile(ASTSource(fn=fused._ln_mod_kernel, signature=dict(sig, **{c: "constexpr" for c in consts}),
                                     constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4, "num_stages": 2})
        assert "cubin" in k.asm, (arch, consts)
    # kv8_write's kernel runs on the RTX cards (attention triton8): their sm_89 and sm_86 too
    sig = dict(kvt_sig, **{k: "constexpr" for k in kvt_c})
    for arch in (89, 86):
        k = triton.compile(ASTSource(fn=kvquant._quant_tokens, signature=sig, constexprs=kvt_c),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
        assert "cubin" in k.asm, arch
    print("compiled")
""")


@pytest.mark.slow
def test_new_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default; set, so that 3.9 does not warn
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and ("ImportError" in r.stderr or "cannot import name" in r.stderr):
        pytest.skip(f"this Triton's compile API differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
