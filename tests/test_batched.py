"""The batched DiT call (one tick's forwards in one call) computes, bit for bit, what B separate forwards
compute (tiny model, CPU, fp32 and bf16), with per-sample windows of different lengths, a wrapped ring,
per-sample timesteps, audio, start frames and rolling-sink shifts; host step caches share one ring of
device windows in a batched call.

What holds bit for bit on this CPU, and why (measured with torch 2.13 / MKL 2024.2 / oneDNN 3.12, 1 and 2
threads): MKL's fp32 GEMM (and oneDNN's bf16 one, on contiguous rows) gives every row of an [M, K] x
[K, N] product the same bits for any M > 1 (M = 1 takes a GEMV path, which rounds differently; no Linear
of a forward has M = 1; a strided bf16 input takes another path, so the FFN chunks a batch by contiguous
rows); CPU SDPA and the row-wise norms are per sample. oneDNN's Conv1d/Conv3d are NOT batch-invariant
(batch 4 vs 4 x batch 1: max |diff| 1.1e-5 for the patch embedding's Conv3d, 1.5e-5 for a Conv1d of the
audio encoder; ATen's own convolution, oneDNN off, is invariant), so the model runs those convolutions
(< 0.1% of a forward's FLOPs) one sample at a time, on every device; the GEMMs, norms and attention run as
on the GPU. `test_onednn_convolutions_depend_on_the_batch` keeps that measurement honest.
"""

import pytest
import torch
import torch.nn.functional as F

from lowvram.demo.tiny import tiny_config, tiny_dit_state_dict
from lowvram.model.dit import build_model
from lowvram.runtime.kv_cache import GpuKV8Cache, GpuKVCache, HostKVCache, KVWorkspace, begin_forwards, slots_for

HW = (16, 16)
TPF = (HW[0] // 2) * (HW[1] // 2)  # tokens per latent frame
CAP = 12 * TPF
T = (1000.0, 857.6923, 602.1506, 8.928572)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    model = build_model(cfg, "meta")
    model.load_state_dict({k: v.float() for k, v in tiny_dit_state_dict(cfg, seed=3).items()}, assign=True)
    g = torch.Generator().manual_seed(11)
    ctx = model.embed_text([torch.randn(5, cfg.text_dim, generator=g)])
    ref, mot = torch.randn(1, 16, 1, *HW, generator=g), torch.randn(1, 16, 19, *HW, generator=g)
    return model, ctx, ref, mot


def _gpu_kv(model, dtype):
    cfg = model.cfg
    return GpuKVCache(cfg.num_layers, CAP, 1, cfg.num_heads, cfg.head_dim, dtype, "cpu")


def _history(model, ctx, sink, caches, blocks, g, dtype):
    """Fill each cache with its own number of earlier blocks (the same inputs into every cache list)."""
    cfg = model.cfg
    for j, n in enumerate(blocks):
        for blk in range(n):
            x = torch.randn(1, 16, 3, *HW, generator=g).to(dtype)
            a = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=g)
            for cs in caches:
                model(x, torch.full((1, 3), 500.0 + j), ctx, a, cs[j], sink, 3 * blk, 5 + j)


def _batched_vs_separate(model, ctx, sink, seq, bat, blocks, g, dtype):
    """One batched call over `bat` against one forward per sample over `seq`; returns both outputs."""
    cfg, b = model.cfg, len(blocks)
    xs = [torch.randn(1, 16, 3, *HW, generator=g).to(dtype) for _ in range(b)]
    audios = [torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(b)]
    starts, shifts = [3 * n for n in blocks], [4, 30, 17, 9][:b]
    one = [model(xs[j], torch.full((1, 3), T[j]), ctx, audios[j], seq[j], sink, starts[j], shifts[j])
           for j in range(b)]
    t = torch.stack([torch.full((3,), T[j]) for j in range(b)])
    out = model(torch.cat(xs), t, ctx, torch.cat(audios), bat, sink, starts, shifts)
    return one, out


def test_batched_forward_equals_separate_forwards_fp32(tiny):
    """Windows of 0, 1, 2 and 12 latent frames before the call (the last one wrapped: block 5 writes at ring
    offset 3 frames), per-sample t, audio, RoPE and sink positions (start 15 with d 9 moves the ref tokens)."""
    model, ctx, ref, mot = tiny
    sink = model.prefill_sink(ref, mot, ctx)
    g = torch.Generator().manual_seed(1)
    blocks = [0, 1, 2, 5]
    seq, bat = ([_gpu_kv(model, torch.float32) for _ in blocks] for _ in range(2))
    _history(model, ctx, sink, (seq, bat), blocks, g, torch.float32)
    one, out = _batched_vs_separate(model, ctx, sink, seq, bat, blocks, g, torch.float32)
    assert out.shape == (4, 16, 3, *HW)
    for j, o in enumerate(one):
        assert torch.equal(out[j:j + 1], o), f"sample {j}: max |diff| {(out[j:j + 1] - o).abs().max():.3g}"
    for a, b in zip(seq, bat):  # every sample wrote its own chunk into its own cache
        assert a.end == b.end and torch.equal(a.k[:, :, :a.end], b.k[:, :, :b.end])
        assert torch.equal(a.v[:, :, :a.end], b.v[:, :, :b.end])
    assert [c.end for c in bat] == [3 * TPF, 6 * TPF, 9 * TPF, CAP]
    # samples differ (per-sample inputs really reach each sample), and a batch of 1 is the plain call
    assert not torch.equal(out[0], out[1])


def test_batched_forward_with_host_caches_in_a_small_ring_bf16(tiny):
    """bf16 (the GPU's dtype): host caches sharing one workspace whose ring (3 slots) is smaller than the
    batch's windows of one layer: window p of the call goes to slot p % 3; outputs and caches bit-identical
    to unbatched forwards on GPU-resident caches, also with the INT8 sink."""
    model, ctx, ref, mot = tiny
    bf = model.to(torch.bfloat16)
    try:
        cfg = bf.cfg
        c16 = ctx.to(torch.bfloat16)
        for int8_sink in (False, True):
            sink = bf.prefill_sink(ref.bfloat16(), mot.bfloat16(), c16, int8=int8_sink)
            g = torch.Generator().manual_seed(2)
            blocks = [4, 0, 2]
            ws = KVWorkspace(CAP, 1, cfg.num_heads, cfg.head_dim, "cpu", n_slots=3, max_new=3 * TPF)
            host = [HostKVCache(cfg.num_layers, CAP, 1, cfg.num_heads, cfg.head_dim, "bf16", "cpu", workspace=ws)
                    for _ in blocks]
            seq = [_gpu_kv(bf, torch.bfloat16) for _ in blocks]
            _history(bf, c16, sink, (seq, host), blocks, g, torch.bfloat16)
            one, out = _batched_vs_separate(bf, c16, sink, seq, host, blocks, g, torch.bfloat16)
            for j, o in enumerate(one):
                assert torch.equal(out[j:j + 1], o), (int8_sink, j)
            for a, h in zip(seq, host):
                assert torch.equal(a.k[:, :, :a.end], h.host[:, 0, :, :h.end])
    finally:
        model.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_caches_with_sink_room_give_the_same_bits(tiny, dtype):
    """GPU step caches with room for the sink behind each window (GpuKVCache.joined: SDPA over views, no
    torch.cat) against caches without it: the same outputs bit for bit over 6 blocks (the ring wraps at block 4),
    unbatched and in a batched call whose windows differ in length; the room really holds the roped sink."""
    from lowvram.kernels import fused
    from lowvram.model.rope import sink_rope_tables

    model, ctx, ref, mot = tiny
    m = model.to(dtype)
    try:
        cfg, c = m.cfg, ctx.to(dtype)
        sink = m.prefill_sink(ref.to(dtype), mot.to(dtype), c)
        ls = sink.k[0].shape[1]

        def room():
            return GpuKVCache(cfg.num_layers, CAP, 1, cfg.num_heads, cfg.head_dim, dtype, "cpu", sink=ls)

        g = torch.Generator().manual_seed(6)
        plain, roomy = _gpu_kv(m, dtype), room()
        for blk in range(6):
            x = torch.randn(1, 16, 3, *HW, generator=g).to(dtype)
            a = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=g)
            outs = [m(x, torch.full((1, 3), T[1]), c, a, kv, sink, 3 * blk, 7) for kv in (plain, roomy)]
            assert torch.equal(outs[0], outs[1]), blk
            ks = fused.rope(sink.k[-1], *sink_rope_tables(m.rope, sink.positions(3 * blk, 7)))
            assert torch.equal(roomy.k[-1, :, roomy.end:roomy.end + ls], ks)  # the last layer's roped sink
        blocks = [0, 2, 5]
        seq, bat = [_gpu_kv(m, dtype) for _ in blocks], [room() for _ in blocks]
        _history(m, c, sink, (seq, bat), blocks, g, dtype)
        one, out = _batched_vs_separate(m, c, sink, seq, bat, blocks, g, dtype)
        for j, o in enumerate(one):
            assert torch.equal(out[j:j + 1], o), j
    finally:
        model.float()


def test_a_batch_needs_one_cache_start_and_shift_per_sample(tiny):
    model, ctx, ref, mot = tiny
    sink = model.prefill_sink(ref, mot, ctx)
    cfg = model.cfg
    x = torch.randn(2, 16, 3, *HW)
    a = torch.randn(2, cfg.num_audio_layers, cfg.audio_dim, 12)
    kv = _gpu_kv(model, torch.float32)
    with pytest.raises(ValueError, match="a batch of 2"):
        model(x, torch.full((2, 3), 500.0), ctx, a, [kv], sink, [0, 3], [4, 4])
    with pytest.raises(ValueError, match="twice"):
        model(x, torch.full((2, 3), 500.0), ctx, a, [kv, kv], sink, [0, 3], [4, 4])


# ------------------------------------------------------------------ the workspace ring
L, H, D = 3, 2, 16
N_NEW = 5
RING = 4 * N_NEW


def _ring_inputs(g, b):
    return [[(torch.randn(1, N_NEW, H, D, generator=g).bfloat16(), torch.randn(1, N_NEW, H, D, generator=g).bfloat16())
             for _ in range(L)] for _ in range(b)]


def _call(caches, starts, new):
    """One batched call's cache traffic in the model's order; the windows each (layer, sample) saw."""
    begin_forwards(caches, starts, N_NEW)
    seen = []
    for layer in range(L):
        for j, c in enumerate(caches):
            k, v = c.update(layer, *new[j][layer])
            ts = (k, v) if v is not None else (k.k, k.k_scale, k.v, k.v_scale, k.k_mean)  # kv8: a KV8Cache view
            seen.append(tuple(t.clone() for t in ts))
            c.done(layer)
    return seen


@pytest.mark.parametrize("n_slots", [2, slots_for(4), 9])
@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "kv8"])
def test_workspace_ring_serves_b_caches_per_call(n_slots, kv_dtype):
    """4 host caches, one call per tick with starts that differ per cache (windows of different lengths, ring
    wraps) against GPU caches: bf16 windows bit-identical, INT8 windows within the 8-bit error and this call's
    chunk exact, kv8 windows bit-identical to GpuKV8Cache's; traffic = each cache's window once per call."""
    from lowvram.metrics import sqnr_db
    from lowvram.runtime.kv_cache import kv_token_bytes

    g = torch.Generator().manual_seed(3)
    int8 = kv_dtype == "int8"
    ws = KVWorkspace(RING, 1, H, D, "cpu", n_slots=n_slots, kv_format=kv_dtype, max_new=N_NEW)
    hosts = [HostKVCache(L, RING, 1, H, D, kv_dtype, "cpu", workspace=ws) for _ in range(4)]
    gpu_cache = GpuKV8Cache if kv_dtype == "kv8" else GpuKVCache
    gpus = [gpu_cache(L, RING, 1, H, D, device="cpu") for _ in range(4)]
    for tick in range(9):  # cache j holds block tick - j: the pipeline's steady state, filling and wrapping
        live = [j for j in range(4) if tick - j >= 0]
        starts = [(tick - j) * N_NEW for j in live]
        new = _ring_inputs(g, len(live))
        want = _call([gpus[j] for j in live], starts, new)
        ws.engine.reset_stats()
        got = _call([hosts[j] for j in live], starts, new)
        for w, h in zip(want, got):
            assert [t.shape for t in w] == [t.shape for t in h]
            if int8:
                assert all(sqnr_db(a.float(), b.float()) > 30 for a, b in zip(w, h))
            else:
                assert all(torch.equal(a, b) for a, b in zip(w, h))
        for j, (k2, *_) in zip(live, got[-len(live):]):  # the chunk this call wrote is exact (bf16, int8)
            off = ((tick - j) * N_NEW) % RING
            assert kv_dtype == "kv8" or torch.equal(k2[:, off:off + N_NEW], new[live.index(j)][L - 1][0])
        windows = sum(hosts[j].end - N_NEW for j in live) * L
        assert ws.engine.bytes_h2d == windows * kv_token_bytes(H, D, kv_dtype)


def test_a_cache_outside_the_call_in_flight_is_refused():
    ws = KVWorkspace(RING, 1, H, D, "cpu", n_slots=3)
    a, b = (HostKVCache(L, RING, 1, H, D, "bf16", "cpu", workspace=ws) for _ in range(2))
    begin_forwards([a], [0], N_NEW)
    with pytest.raises(ValueError, match="did not begin"):
        b.update(0, *_ring_inputs(torch.Generator().manual_seed(0), 1)[0][0])
    other = HostKVCache(L, RING, 1, H, D, "bf16", "cpu")
    with pytest.raises(ValueError, match="share one KVWorkspace"):
        begin_forwards([a, other], [5, 0], N_NEW)


# ------------------------------------------------------------------ CPU batch invariance, measured
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_gemm_rows_do_not_depend_on_the_batch(dtype):
    """The rows of a batched Linear equal the per-sample Linear's bit for bit (12 or more contiguous rows per sample:
    MKL fp32, oneDNN bf16). Fewer take other paths (on an AMD EPYC MKL's fp32 GEMM of 1-11 rows, but 4 and 8,
    differs from the same rows in a larger GEMM), so the model runs its GEMMs of a few rows per sample (the time
    embedding, the audio injector's AdaLN). A strided bf16 input ([B, rows, C] sliced out of [B, L, C]) takes
    another path: measured max |diff| 0.125 against the contiguous rows, so the blocks' FFN chunks a batch by
    contiguous rows."""
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    for m in (12, 15, 64, 192):
        xs = [torch.randn(m, 64, generator=g).to(dtype) for _ in range(4)]
        assert torch.equal(F.linear(torch.cat(xs), w, b), torch.cat([F.linear(x, w, b) for x in xs])), m


def test_onednn_convolutions_depend_on_the_batch():
    """Why the model's convolutions run per sample: measured here, oneDNN's batch-4 Conv3d differs from four
    batch-1 calls; ATen's own convolution (oneDNN off) does not. If a future oneDNN is invariant this test
    says so (then the per-sample convolutions could go)."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(64, 16, 1, 2, 2, generator=g), torch.randn(64, generator=g)
    xs = [torch.randn(1, 16, 3, *HW, generator=g) for _ in range(4)]
    conv = lambda x: F.conv3d(x, w, b, stride=(1, 2, 2))  # noqa: E731  the patch embedding's shape
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(conv(torch.cat(xs)), torch.cat([conv(x) for x in xs]))
    diff = (conv(torch.cat(xs)) - torch.cat([conv(x) for x in xs])).abs().max().item()
    if torch.backends.mkldnn.is_available():
        assert diff < 1e-4  # measured 1.1e-5 (oneDNN 3.12); 0 would mean oneDNN became batch-invariant
        print(f"oneDNN Conv3d batch 4 vs 4 x batch 1: max |diff| {diff:.3g}")
