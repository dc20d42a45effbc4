"""Two-segment attention kernels (bf16 and 8-bit) against float64 references.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported). GPU: `-m cuda`.
Rules: bf16 error vs float64 <= 2 x (plain bf16 torch error) + 1e-3; 8-bit SQNR >= 30 dB.
"""

import os

if not __import__("torch").cuda.is_available():  # on a GPU the cuda-marked tests run the compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowvram.kernels import attention8 as A8  # noqa: E402
from lowvram.kernels.attention import two_segment_attention  # noqa: E402
from lowvram.kernels.configs import INTERPRETER_WHY, interpreter_ready  # noqa: E402
from lowvram.kernels.reference import attention_reference, rel_error  # noqa: E402
from lowvram.metrics import sqnr_db  # noqa: E402
from lowvram.model.rope import RopeTable, sink_rope_tables  # noqa: E402

BF = torch.bfloat16
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
on_cpu = pytest.mark.skipif(not interpreter_ready(), reason=INTERPRETER_WHY)


def make_inputs(seed, B, Lq, Lw, Ls, H, D, device="cpu", outliers=False, spare=7):
    """Random q, a window that is a view of a longer cache, sink keys/values and positions."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sd=1.0: (torch.randn(*s, generator=g) * sd)  # noqa: E731
    q = rnd(B, Lq, H, D, sd=1.5)
    kc = rnd(B, Lw + spare, H, D, sd=1.5)
    if outliers:  # a few channels with a large constant offset, as in real keys
        kc[..., torch.randperm(D, generator=g)[:4]] += 8.0
    vc = rnd(B, Lw + spare, H, D)
    ks, vs = rnd(B, Ls, H, D, sd=1.5), rnd(B, Ls, H, D)
    pos = torch.stack([torch.randint(-6, 30, (Ls,), generator=g), torch.randint(0, 44, (Ls,), generator=g),
                       torch.randint(0, 24, (Ls,), generator=g)], dim=-1)
    to = lambda x: x.to(device=device, dtype=BF)  # noqa: E731
    return dict(q=to(q), k_win=to(kc)[:, :Lw], v_win=to(vc)[:, :Lw], k_sink=to(ks), v_sink=to(vs),
                sink_pos=pos.to(device))


def roped(inp, rope):
    """inp with sink_pos replaced by the sink's multipliers (sink_cos, sink_sin), as the model passes them."""
    args = {k: v for k, v in inp.items() if k != "sink_pos"}
    args["sink_cos"], args["sink_sin"] = sink_rope_tables(rope, inp["sink_pos"])
    return args


def poisoned(like):
    return torch.full_like(like, float("nan"))


def check_bf16(inp, rope, **kw):
    args = roped(inp, rope)
    out = two_segment_attention(**args, out=poisoned(inp["q"]), **kw)
    ref = attention_reference(**args)
    base = rel_error(attention_reference(**args, compute_dtype=BF), ref)
    err = rel_error(out, ref)
    assert not out.isnan().any(), "unwritten output elements"
    assert err <= 2 * base + 1e-3, f"error {err:.2e} vs plain bf16 torch {base:.2e}"
    return out


@on_cpu
@pytest.mark.parametrize("B,D,block,tma", [(1, 64, None, False), (3, 128, None, False), (1, 64, (16, 16), False),
                                           (1, 32, (16, 32), False), (3, 64, None, True), (1, 128, (16, 32), True)])
def test_bf16_two_segments(B, D, block, tma):
    # window 100 (a tail tile for both block sizes) as a strided view; sink 17 with negative times;
    # pointer loads and tensor-descriptor (TMA) loads, whose out-of-range rows (q past 33, the sink's
    # last tile) read as zeros
    inp = make_inputs(B * 10 + D, B, 33, 100, 17, 2, D)
    check_bf16(inp, RopeTable.build(D, 64), block=block, tma=tma)


def test_tma_needs_aligned_nonempty_segments():
    from lowvram.kernels.attention import TensorDescriptor, tma_usable

    if TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    inp = make_inputs(3, 1, 33, 100, 17, 2, 64)
    assert tma_usable(inp["q"], inp["k_win"], inp["k_sink"])
    assert not tma_usable(inp["q"], inp["k_win"][:, :0])  # an empty segment: pointer loads
    odd = torch.empty(33 * 2 * 64 + 1, dtype=BF)[1:].view(1, 33, 2, 64)  # base 2 bytes off 16
    assert not tma_usable(odd)
    with pytest.raises(ValueError, match="tma=True"):
        two_segment_attention(**roped(dict(inp, k_win=inp["k_win"][:, :0], v_win=inp["v_win"][:, :0]),
                                      RopeTable.build(64, 64)), tma=True, backend="triton")


def test_sink_rope_tables_equal_the_model_gather():
    inp = make_inputs(2, 1, 1, 0, 50, 1, 128)
    rope = RopeTable.build(128, 64)
    cos, sin = sink_rope_tables(rope, inp["sink_pos"])
    ref_cos, ref_sin = rope.gather(inp["sink_pos"], dtype=torch.float16)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and (inp["sink_pos"][:, 0] < 0).any()


@on_cpu
@pytest.mark.parametrize("Lw,Ls", [(0, 17), (96, 0), (64, 33)])
def test_bf16_single_segment_and_exact_tiles(Lw, Ls):
    # window empty (sink prefill), sink empty, and a window of whole 32-key tiles (no tail branch)
    inp = make_inputs(Lw + Ls, 1, 33, Lw, Ls, 2, 64)
    check_bf16(inp, RopeTable.build(64, 64))


@on_cpu
def test_sink_rope_matters_and_positions_are_used():
    # the same sink keys at other positions must give another output (the kernel really ropes)
    inp = make_inputs(5, 1, 33, 0, 17, 2, 64)
    rope = RopeTable.build(64, 64)
    a = two_segment_attention(**roped(inp, rope))
    inp["sink_pos"] = inp["sink_pos"].flip(0)
    b = check_bf16(inp, rope)
    assert rel_error(a, b) > 0.05


def test_torch_backend_matches_reference():
    inp = make_inputs(11, 3, 33, 100, 17, 2, 64)
    check_bf16(inp, RopeTable.build(64, 64), backend="torch")


def test_empty_keys_rejected():
    inp = make_inputs(1, 1, 5, 0, 0, 2, 32)
    with pytest.raises(ValueError):
        two_segment_attention(**roped(inp, RopeTable.build(32, 8)))


def write_cache(inp, chunk=64, spare=40):
    """Quantize the window into a KV8Cache in two ring writes; returns (cache, window view)."""
    B, Lw, H, D = inp["k_win"].shape
    cache = A8.kv8_alloc(B, Lw + spare, H, D, device=inp["q"].device)
    for s in range(0, Lw, chunk):
        A8.kv8_write(cache, s, inp["k_win"][:, s:s + chunk], inp["v_win"][:, s:s + chunk])
    return cache, A8.kv8_window(cache, Lw)


def check_8bit(inp, rope, floor_db=30.0, **kw):
    _, win = write_cache(inp)
    full = roped(inp, rope)
    args = {k: v for k, v in full.items() if k not in ("k_win", "v_win")}
    out = A8.two_segment_attention8(**args, win=win, out=poisoned(inp["q"]), **kw)
    ref = attention_reference(**full)
    assert not out.isnan().any(), "unwritten output elements"
    db = sqnr_db(ref, out)
    assert db >= floor_db, f"SQNR {db:.1f} dB"
    return out


@on_cpu
@pytest.mark.parametrize("B,D,Lw,block", [(1, 64, 100, None), (3, 128, 100, None), (1, 64, 96, (16, 32)),
                                          (1, 32, 0, None)])
def test_8bit_sqnr(B, D, Lw, block):
    inp = make_inputs(B + D + Lw, B, 33, Lw, 17, 2, D, outliers=True)
    check_8bit(inp, RopeTable.build(D, 64), block=block)


def test_8bit_torch_backend():
    inp = make_inputs(3, 1, 33, 100, 17, 2, 64, outliers=True)
    check_8bit(inp, RopeTable.build(64, 64), backend="torch")


def test_kv8_cache_format():
    inp = make_inputs(4, 2, 3, 100, 0, 2, 64, outliers=True)
    cache, win = write_cache(inp)
    first_mean = inp["k_win"][:, :64].float().mean(dim=1)
    assert torch.allclose(cache.k_mean, first_mean), "the mean must come from the first write only"
    k, v = A8.kv8_dequantize(win, torch.float64)
    assert sqnr_db(inp["k_win"], k) > 38 and sqnr_db(inp["v_win"], v) > 38
    assert cache.k.dtype == torch.int8 and cache.v.dtype == torch.int8 and win.k.shape[1] == 100
    with pytest.raises(ValueError):
        A8.kv8_write(cache, cache.length - 10, inp["k_win"][:, :64], inp["v_win"][:, :64])


@cuda
@needs_cuda
@pytest.mark.parametrize("B,D", [(1, 128), (2, 64)])
def test_gpu_bf16_and_8bit(B, D):
    inp = make_inputs(B * D, B, 777, 3000, 701, 4, D, device="cuda", outliers=True, spare=333)
    rope = RopeTable.build(D, 256, device="cuda")
    check_bf16(inp, rope)
    check_bf16(inp, rope, block=(64, 64))
    check_8bit(inp, rope)
    check_8bit(inp, rope, block=(64, 64))


def test_sink_multipliers_shape_checked():
    inp = make_inputs(6, 1, 5, 8, 9, 2, 32)
    args = roped(inp, RopeTable.build(32, 64))
    with pytest.raises(ValueError, match="sink_cos must be"):
        two_segment_attention(**dict(args, sink_cos=args["sink_cos"][:4]), backend="triton")


def test_kernels_do_not_import_the_model():
    # the model imports the kernels; the kernels take tensors and never import lowvram.model back
    import subprocess
    import sys

    code = ("import sys; import lowvram.kernels.attention, lowvram.kernels.attention8, lowvram.kernels.fused, "
            "lowvram.kernels.gemm, lowvram.kernels.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('lowvram.model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
