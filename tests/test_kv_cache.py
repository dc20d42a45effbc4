import math

import pytest
import torch

from lowvram.kernels.attention8 import two_segment_attention8
from lowvram.kernels.rowquant import dequantize_rows, quantize_rows_int8
from lowvram.runtime.kv_cache import (
    GpuKV8Cache,
    GpuKVCache,
    HostKVCache,
    KVWorkspace,
    kv_token_bytes,
    kv_workspace_bytes,
)

L, B, H, D = 3, 2, 3, 16
N_NEW, CAP = 5, 20  # 4 chunks per ring


def _chunks(g, n):
    return [(torch.randn(B, N_NEW, H, D, generator=g).bfloat16(), torch.randn(B, N_NEW, H, D, generator=g).bfloat16())
            for _ in range(n)]


def _run(caches, starts, g):
    """Feed the same random chunks to every cache; return the windows each layer saw, per cache."""
    seen = [[] for _ in caches]
    for start in starts:
        new = _chunks(g, L)
        for c in caches:
            c.begin_forward(start, N_NEW)
        for layer in range(L):
            for ci, c in enumerate(caches):
                k, v = c.update(layer, *new[layer])
                seen[ci].append((start, layer, k.clone(), v.clone(), new[layer]))
                c.done(layer)
    return seen


def test_gpu_cache_ring_semantics():
    g = torch.Generator().manual_seed(0)
    cache = GpuKVCache(L, CAP, B, H, D, device="cpu")
    starts = list(range(0, 9 * N_NEW, N_NEW))  # 9 forwards: the ring wraps after 4
    history = {}  # (layer, ring position) -> latest K written there
    for start, layer, k, v, (k_new, v_new) in _run([cache], starts, g)[0]:
        off = start % CAP
        end = CAP if start >= CAP else start + N_NEW
        assert k.shape == (B, end, H, D) and v.shape == k.shape and k.dtype == torch.bfloat16
        assert torch.equal(k[:, off:off + N_NEW], k_new) and torch.equal(v[:, off:off + N_NEW], v_new)
        for p in range(end):
            if not off <= p < off + N_NEW:
                assert torch.equal(k[:, p], history[layer, p])
        for j in range(N_NEW):
            history[layer, off + j] = k_new[:, j]


def test_host_bf16_bit_identical_to_gpu_cache_with_wraparound():
    g = torch.Generator().manual_seed(1)
    gpu = GpuKVCache(L, CAP, B, H, D, device="cpu")
    host = HostKVCache(L, CAP, B, H, D, kv_dtype="bf16", device="cpu", n_slots=2)
    starts = list(range(0, 10 * N_NEW, N_NEW))
    a, b = _run([gpu, host], starts, g)
    for (s1, l1, k1, v1, _), (s2, l2, k2, v2, _) in zip(a, b):
        assert (s1, l1) == (s2, l2)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # traffic of one full-window forward: the window minus the chunk in, the chunk out
    host.reset_stats()
    _run([host], [10 * N_NEW], g)
    tok = kv_token_bytes(H, D, "bf16") * B * L
    assert host.stats()["bytes_h2d"] == (CAP - N_NEW) * tok and host.stats()["bytes_d2h"] == N_NEW * tok


def test_four_step_caches_share_one_workspace():
    g = torch.Generator().manual_seed(2)
    ws = KVWorkspace(CAP, B, H, D, "cpu", n_slots=3)
    hosts = [HostKVCache(L, CAP, B, H, D, device="cpu", workspace=ws) for _ in range(4)]
    gpus = [GpuKVCache(L, CAP, B, H, D, device="cpu") for _ in range(4)]
    for blk in range(7):  # per block, step caches 0..3 in turn, like the pipeline
        for step in range(4):
            a, b = _run([gpus[step], hosts[step]], [blk * N_NEW], g)
            assert all(torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b))


def test_aborted_forward_is_retried_cleanly():
    g = torch.Generator().manual_seed(3)
    gpu = GpuKVCache(L, CAP, B, H, D, device="cpu")
    host = HostKVCache(L, CAP, B, H, D, device="cpu")
    _run([gpu, host], [0, 5, 10, 15, 20], g)
    host.begin_forward(25, N_NEW)  # a forward that dies after one layer (e.g. a CUDA OOM)
    host.update(0, *_chunks(g, 1)[0])
    a, b = _run([gpu, host], [25, 30], g)
    assert all(torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b))
    host.reset()
    host.begin_forward(0, N_NEW)
    assert host.end == N_NEW


def test_int8_host_cache_sqnr_and_halved_traffic():
    g = torch.Generator().manual_seed(4)
    d = 128  # the real head dim
    gpu = GpuKVCache(2, 4 * 33, 1, 5, d, device="cpu")
    host = HostKVCache(2, 4 * 33, 1, 5, d, kv_dtype="int8", device="cpu", max_new=33)
    sig = err = 0.0
    for blk in range(6):
        new = [(torch.randn(1, 33, 5, d, generator=g).bfloat16(), torch.randn(1, 33, 5, d, generator=g).bfloat16())
               for _ in range(2)]
        for c in (gpu, host):
            c.begin_forward(blk * 33, 33)
        for layer in range(2):
            k1, v1 = gpu.update(layer, *new[layer])
            k2, v2 = host.update(layer, *new[layer])
            off = (blk * 33) % (4 * 33)
            assert torch.equal(k2[:, off:off + 33], new[layer][0])  # this forward's chunk is exact
            sig += k1.float().pow(2).sum() + v1.float().pow(2).sum()
            err += (k1.float() - k2.float()).pow(2).sum() + (v1.float() - v2.float()).pow(2).sum()
            gpu.done(layer)
            host.done(layer)
    sqnr = 10 * math.log10(sig / err)
    print(f"int8 KV SQNR {sqnr:.1f} dB")
    assert sqnr > 40.0, sqnr  # measured 45.3 dB on Gaussian data (per-token-per-head absmax INT8)
    assert kv_token_bytes(40, 128, "int8") / kv_token_bytes(40, 128, "bf16") == pytest.approx(0.516, abs=1e-3)


def test_quantize_roundtrip_and_workspace_bytes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, 24, generator=g) * torch.rand(3, 7, 4, 1, generator=g) * 10
    q, s = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and s.shape == x.shape[:-1] and int(q.abs().max()) == 127
    out = dequantize_rows(q, s, out=torch.empty_like(x))
    assert ((out - x).abs() <= s.unsqueeze(-1) / 2 + 1e-6).all()
    ws = KVWorkspace(CAP, B, H, D, "cpu", n_slots=2, kv_format="int8", max_new=N_NEW)
    held = sum(t.numel() * t.element_size() for t in (ws.kv, ws.stage_q, ws.stage_s, ws.wb_q, ws.wb_s))
    assert held + 3 * B * N_NEW * H * D * 4 == kv_workspace_bytes(CAP, N_NEW, H, D, "int8", 2, B)


def test_bad_chunks():
    cache = GpuKVCache(L, CAP, B, H, D, device="cpu")
    with pytest.raises(ValueError, match="does not fit"):
        cache.begin_forward(17, N_NEW)
    with pytest.raises(ValueError, match="kv_dtype"):
        HostKVCache(L, CAP, B, H, D, kv_dtype="fp8", device="cpu")
    ws = KVWorkspace(CAP, B, H, D, "cpu")
    with pytest.raises(ValueError, match="workspace"):
        HostKVCache(L, CAP, B, H, D, kv_dtype="int8", device="cpu", workspace=ws)
    ws8 = KVWorkspace(CAP, B, H, D, "cpu", kv_format="int8", max_new=N_NEW)
    with pytest.raises(ValueError, match="format"):
        HostKVCache(L, CAP, B, H, D, kv_dtype="kv8", device="cpu", workspace=ws8)


# ------------------------------------------------------------------ kv8: the 8-bit kernel's format in host memory
D8 = 32  # a head dim the 8-bit kernel takes (the tiny model's)


def _kv8_run(caches, starts, g, d=D8, device="cpu", attend=(), abort_at=None):
    """Feed the same random chunks (bf16, with per-channel offsets as real keys have) to kv8 caches, one forward
    per start; per cache, every window it returned (cloned: k, k_scale, v, v_scale, k_mean) and, for the starts
    in `attend`, the 8-bit attention of random queries over each layer's window and a random sink.
    abort_at: the forward of this start stops after layer 0 (a CUDA OOM) and runs again."""
    seen, outs = [[] for _ in caches], [[] for _ in caches]
    for start in starts:
        new = [(torch.randn(B, N_NEW, H, d, generator=g) + 3 * torch.randn(1, 1, H, d, generator=g),
                torch.randn(B, N_NEW, H, d, generator=g)) for _ in range(L)]
        new = [tuple(t.bfloat16().to(device) for t in kv) for kv in new]
        q = torch.randn(B, 2 * N_NEW, H, d, generator=g).bfloat16().to(device)
        ks, vs = (torch.randn(B, 7, H, d, generator=g).bfloat16().to(device) for _ in range(2))
        ang = torch.rand(7, d // 2, generator=g).to(device) * 6
        for layers in ((1, L) if start == abort_at else (L,)):
            for c in caches:
                c.begin_forward(start, N_NEW)
            for layer in range(layers):
                for ci, c in enumerate(caches):
                    win, none = c.update(layer, *new[layer])
                    assert none is None and win.k.shape == (B, c.end, H, d)
                    seen[ci].append((start, layer, [t.clone() for t in (win.k, win.k_scale, win.v, win.v_scale,
                                                                         win.k_mean)]))
                    if start in attend and layers == L:
                        outs[ci].append(two_segment_attention8(q, win, ks, vs, ang.cos(), ang.sin()))
                    c.done(layer)
    return seen, outs


def _same(a, b):
    return len(a) == len(b) and all((s1, l1) == (s2, l2) and all(torch.equal(x, y) for x, y in zip(t1, t2))
                                    for (s1, l1, t1), (s2, l2, t2) in zip(a, b))


def test_host_kv8_equals_the_gpu_kv8_cache_bit_for_bit():
    """Host kv8 caches (windows streamed through 2 slots) hold, window by window, the bytes GpuKV8Cache holds:
    K, V, scales and the K mean fixed at the first write, across the ring's wrap, an aborted forward run again
    and a reset (a new video, a new mean); the 8-bit kernel's outputs over them are bit-identical; the traffic
    is int8's."""
    g = torch.Generator().manual_seed(8)
    gpu = GpuKV8Cache(L, CAP, B, H, D8, device="cpu")
    host = HostKVCache(L, CAP, B, H, D8, kv_dtype="kv8", device="cpu", max_new=N_NEW)
    starts = list(range(0, 9 * N_NEW, N_NEW))  # the ring wraps after 4
    (a, b), (oa, ob) = _kv8_run([gpu, host], starts, g, attend=(2 * N_NEW, 5 * N_NEW, 7 * N_NEW), abort_at=5 * N_NEW)
    assert _same(a, b) and len(a) == len(starts) * L + 1
    assert len(oa) == len(ob) == 3 * L and all(torch.equal(x, y) and x.abs().sum() > 0 for x, y in zip(oa, ob))
    first = [t[4] for _, layer, t in a[:L]]  # each layer's mean, from its first write
    assert all(torch.equal(t[4], first[layer]) for _, layer, t in a)
    for c in (gpu, host):
        c.reset()
    (a, b), _ = _kv8_run([gpu, host], [0, N_NEW], g)
    assert _same(a, b) and not torch.equal(a[0][2][4], first[0])  # a new video: a new mean
    host.reset_stats()
    _kv8_run([host], [9 * N_NEW], g)  # one full-window forward: the window but the chunk in, the chunk out
    tok = kv_token_bytes(H, D8, "kv8") * B * L
    assert tok == kv_token_bytes(H, D8, "int8") * B * L
    assert host.stats()["bytes_h2d"] == (CAP - N_NEW) * tok and host.stats()["bytes_d2h"] == N_NEW * tok


def test_kv8_workspace_bytes_are_the_allocated_ones():
    for slots, batch in ((2, 1), (5, 2)):
        ws = KVWorkspace(CAP, batch, H, D8, "cpu", n_slots=slots, kv_format="kv8", max_new=N_NEW)
        assert ws.nbytes() == kv_workspace_bytes(CAP, N_NEW, H, D8, "kv8", slots, batch)
        assert not hasattr(ws, "kv")  # no bf16 windows
    # at full size (2 slots): 0.35 GB against int8's 0.88 GB (bf16 windows, staging, quantization temporaries)
    assert kv_workspace_bytes(12672, 3168, 40, 128, "kv8") < 0.45 * kv_workspace_bytes(12672, 3168, 40, 128, "int8")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_kv8_bit_identical_cuda():
    """On the GPU (copy streams, events, pinned memory, the compiled 8-bit kernel), at the real head dim: host kv8
    windows and attention outputs equal GpuKV8Cache's bit for bit."""
    g = torch.Generator().manual_seed(9)
    gpu = GpuKV8Cache(L, CAP, B, H, 128, device="cuda")
    host = HostKVCache(L, CAP, B, H, 128, kv_dtype="kv8", device="cuda", max_new=N_NEW)
    assert host.pinned
    (a, b), (oa, ob) = _kv8_run([gpu, host], list(range(0, 9 * N_NEW, N_NEW)), g, 128, "cuda",
                                attend=(3 * N_NEW, 8 * N_NEW), abort_at=6 * N_NEW)
    assert _same(a, b) and len(oa) == 2 * L and all(torch.equal(x, y) for x, y in zip(oa, ob))
    st = host.stats()
    assert st["copy_busy_s"] > 0 and st["writeback_busy_s"] > 0
    assert st["bytes_d2h"] == (9 * L + 1) * B * N_NEW * kv_token_bytes(H, 128, "kv8")  # + the aborted layer 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_bf16_bit_identical_cuda():
    g = torch.Generator().manual_seed(6)
    gpu = GpuKVCache(L, CAP, B, H, D, device="cuda")
    host = HostKVCache(L, CAP, B, H, D, kv_dtype="bf16", device="cuda")
    assert host.pinned
    for start in range(0, 10 * N_NEW, N_NEW):
        new = [tuple(t.cuda() for t in c) for c in _chunks(g, L)]
        gpu.begin_forward(start, N_NEW)
        host.begin_forward(start, N_NEW)
        for layer in range(L):
            k1, v1 = gpu.update(layer, *new[layer])
            k2, v2 = host.update(layer, *new[layer])
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
            host.done(layer)
    assert host.stats()["copy_busy_s"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_int8_cuda_sqnr():
    g = torch.Generator().manual_seed(7)
    gpu = GpuKVCache(L, CAP, B, H, 128, device="cuda")
    host = HostKVCache(L, CAP, B, H, 128, kv_dtype="int8", device="cuda", max_new=N_NEW)
    sig = err = 0.0
    for start in range(0, 9 * N_NEW, N_NEW):
        gpu.begin_forward(start, N_NEW)
        host.begin_forward(start, N_NEW)
        for layer in range(L):
            k, v = (torch.randn(B, N_NEW, H, 128, generator=g).bfloat16().cuda() for _ in range(2))
            k1, v1 = gpu.update(layer, k, v)
            k2, v2 = host.update(layer, k, v)
            sig += float(k1.float().pow(2).sum() + v1.float().pow(2).sum())
            err += float((k1.float() - k2.float()).pow(2).sum() + (v1.float() - v2.float()).pow(2).sum())
            host.done(layer)
    assert 10 * math.log10(sig / err) > 40.0
    st = host.stats()
    assert st["bytes_d2h"] == 9 * L * B * N_NEW * kv_token_bytes(H, 128, "int8") and st["writeback_busy_s"] > 0


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_joined_is_the_window_then_the_sink_and_leaves_the_cache_unchanged(fmt):
    """HostKVCache.joined writes the (roped) sink behind the window in the window's own slot: the same tensor as
    torch.cat([window, sink]) at every fill level and after the ring wraps, for several caches sharing a
    workspace; the windows of later forwards are the ones a workspace without sink room gives (the sink tokens
    never leak into a window or its write-back). No room (kv8, a sink longer than the room): None."""
    ls = 7
    g = torch.Generator().manual_seed(11)
    ws = KVWorkspace(CAP, B, H, D, "cpu", n_slots=3, kv_format=fmt, max_new=N_NEW, sink=ls)
    ws0 = KVWorkspace(CAP, B, H, D, "cpu", n_slots=3, kv_format=fmt, max_new=N_NEW)
    assert ws.nbytes() - ws0.nbytes() == 3 * 2 * B * ls * H * D * 2
    assert ws.nbytes() + (3 * B * N_NEW * H * D * 4 if fmt == "int8" else 0) == kv_workspace_bytes(
        CAP, N_NEW, H, D, fmt, 3, B, sink=ls)
    with_room = [HostKVCache(L, CAP, B, H, D, fmt, device="cpu", workspace=ws) for _ in range(2)]
    without = [HostKVCache(L, CAP, B, H, D, fmt, device="cpu", workspace=ws0) for _ in range(2)]
    for start in range(0, 7 * N_NEW, N_NEW):  # fill (end 5..20), then wrap
        new = [_chunks(g, L) for _ in with_room]
        sinks = [(torch.randn(B, ls, H, D, generator=g).bfloat16(), torch.randn(B, ls, H, D, generator=g).bfloat16())
                 for _ in range(L)]
        for group in (with_room, without):
            for c in group:
                c._advance(start, N_NEW)
            group[0].ws.begin(group)
        for layer in range(L):
            for j, (c, c0) in enumerate(zip(with_room, without)):
                kw, vw = c.update(layer, *new[j][layer])
                k0, v0 = c0.update(layer, *new[j][layer])
                assert torch.equal(kw, k0) and torch.equal(vw, v0)
                k, v = c.joined(layer, *sinks[layer])
                assert torch.equal(k, torch.cat([k0, sinks[layer][0]], 1))
                assert torch.equal(v, torch.cat([v0, sinks[layer][1]], 1))
                assert c0.joined(layer, *sinks[layer]) is None
                c.done(layer)
                c0.done(layer)
    longer = torch.randn(B, ls + 1, H, D).bfloat16()
    c = with_room[0]
    c.begin_forward(7 * N_NEW, N_NEW)
    c.update(0, *_chunks(g, 1)[0])
    assert c.joined(0, longer, longer) is None
    ws8 = KVWorkspace(CAP, B, H, D, "cpu", kv_format="kv8", max_new=N_NEW, sink=ls)
    assert ws8.sink == 0
    assert c.joined(0, longer[:, :ls].float(), longer[:, :ls].float()) is None  # an fp32 model's sink: torch.cat


def test_gpu_sink_room_takes_the_roped_keys_in_place_and_keeps_a_full_rings_v_sink():
    """room(): the sink keys roped straight into the room (fused.rope(out=)) are joined's K with no copy; once the
    ring is full nothing else writes the room, so the same V sink (one tensor, call after call: the bf16 sink's
    layer) is not copied again, and one modified in place or a new one is. Every joined equals torch.cat of the
    window and the sink over two ring cycles with the same sink tensors."""
    from lowvram.kernels import fused
    from lowvram.kernels.reference import rope_apply

    ls = 7
    g = torch.Generator().manual_seed(13)
    cache, plain = GpuKVCache(L, CAP, 1, H, D, device="cpu", sink=ls), GpuKVCache(L, CAP, 1, H, D, device="cpu")
    sinks = [(torch.randn(1, ls, H, D, generator=g).bfloat16(), torch.randn(1, ls, H, D, generator=g).bfloat16())
             for _ in range(L)]
    ang = torch.rand(ls, D // 2, generator=g) * 6.3
    cos, sin = ang.cos().half(), ang.sin().half()

    def call(start, poisoned=()):  # poisoned: layers whose V sink the test overwrote in the room
        new = [(k[:1], v[:1]) for k, v in _chunks(g, L)]
        for c in (cache, plain):
            c.begin_forward(start, N_NEW)
        for layer in range(L):
            cache.update(layer, *new[layer])
            k0, v0 = plain.update(layer, *new[layer])
            room = cache.room(layer, ls, torch.bfloat16)
            ks = fused.rope(sinks[layer][0], cos, sin, out=room)
            assert ks.data_ptr() == room.data_ptr() and torch.equal(ks, rope_apply(sinks[layer][0], cos, sin))
            k, v = cache.joined(layer, ks, sinks[layer][1])
            e = cache.end
            assert torch.equal(k, torch.cat([k0, ks], 1)) and torch.equal(v[:, :e], v0)
            assert torch.equal(v[:, e:], sinks[layer][1]) != (layer in poisoned)

    for start in range(0, 8 * N_NEW, N_NEW):  # fills (the room is overwritten by the next chunk), then full
        call(start)
    assert cache.end == CAP
    cache.v[0, :, CAP:CAP + ls] = 0  # a full ring's V sink is kept: not written again by the next call ...
    call(8 * N_NEW, poisoned=(0,))
    assert cache.v[0, :, CAP:].abs().max() == 0 and torch.equal(cache.v[1, :, CAP:], sinks[1][1])
    sinks[0][1].mul_(2)  # ... unless the tensor changed in place (its version) ...
    sinks[1] = (sinks[1][0], torch.randn(1, ls, H, D, generator=g).bfloat16())  # ... or is another one
    call(9 * N_NEW)
    assert torch.equal(cache.v[0, :, CAP:], sinks[0][1]) and torch.equal(cache.v[1, :, CAP:], sinks[1][1])
    assert cache.room(0, ls + 1, torch.bfloat16) is None and cache.room(0, ls, torch.float32) is None
    cache.reset()
    cache.begin_forward(0, N_NEW)
    assert cache.room(0, ls, torch.bfloat16).data_ptr() == cache.k[0, :, N_NEW].data_ptr()  # behind the window


def test_gpu_joined_is_the_window_then_the_sink_over_a_ring_cycle():
    """GpuKVCache.joined writes the (roped) sink behind the layer's window in the cache's room: the same tensor as
    torch.cat([window, sink]) at every fill level, at the wrap and after it, with fresh random chunks and sinks
    each forward (not zeros: a stale sink inside a later window would show); the windows equal those of a cache
    without room (the sink never leaks into a window), which gives None. A longer sink or another dtype: None."""
    ls = 7
    g = torch.Generator().manual_seed(12)
    room, plain = GpuKVCache(L, CAP, B, H, D, device="cpu", sink=ls), GpuKVCache(L, CAP, B, H, D, device="cpu")
    assert room.nbytes() - plain.nbytes() == 2 * L * B * ls * H * D * 2 and room.k.shape[2] == CAP + ls
    for start in range(0, 9 * N_NEW, N_NEW):  # end 5, 10, 15, 20 (full), then the ring wraps and wraps again
        new = _chunks(g, L)
        sinks = [(torch.randn(B, ls, H, D, generator=g).bfloat16(), torch.randn(B, ls, H, D, generator=g).bfloat16())
                 for _ in range(L)]
        for c in (room, plain):
            c.begin_forward(start, N_NEW)
        for layer in range(L):
            kw, vw = room.update(layer, *new[layer])
            k0, v0 = plain.update(layer, *new[layer])
            assert torch.equal(kw, k0) and torch.equal(vw, v0)
            k, v = room.joined(layer, *sinks[layer])
            assert k.shape == (B, room.end + ls, H, D)
            assert torch.equal(k, torch.cat([k0, sinks[layer][0]], 1))
            assert torch.equal(v, torch.cat([v0, sinks[layer][1]], 1))
            assert plain.joined(layer, *sinks[layer]) is None
    longer = torch.randn(B, ls + 1, H, D).bfloat16()
    assert room.joined(0, longer, longer) is None
    assert room.joined(0, longer[:, :ls].float(), longer[:, :ls].float()) is None  # torch.cat would promote
