"""The S2V DiT: real-size structure, RoPE exactness, sink and streaming semantics (tiny, CPU, fp32)."""

import pytest
import torch

from lowvram.demo.tiny import tiny_config, tiny_dit_state_dict
from lowvram.model.config import DiTConfig
from lowvram.model.dit import Sink, build_model
from lowvram.model.framepack import FramePackMotioner
from lowvram.model.rope import RopeTable, grid_positions, rope_apply, rope_pairs, rope_params, strided

REAL = dict(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)


def test_real_model_has_the_checkpoint_keys_and_parameter_count():
    model = build_model(DiTConfig.from_dict(REAL), device="meta")
    sd = model.state_dict()
    assert len(sd) == 1260
    assert sum(p.numel() for p in model.parameters()) == 16_295_755_609
    assert sum(1 for k in sd if k.startswith("blocks.7.")) == 27
    shapes = {
        "patch_embedding.weight": (5120, 16, 1, 2, 2), "time_projection.1.weight": (30720, 5120),
        "head.modulation": (1, 2, 5120), "blocks.39.ffn.0.weight": (13824, 5120), "blocks.0.modulation": (1, 6, 5120),
        "blocks.3.norm3.bias": (5120,), "casual_audio_encoder.weights": (1, 25, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (5120, 1024, 3),
        "casual_audio_encoder.encoder.conv2.conv.weight": (2560, 1280, 3),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, 5120),
        "audio_injector.injector.11.norm_k.weight": (5120,),
        "audio_injector.injector_adain_layers.0.linear.weight": (10240, 5120),
        "frame_packer.proj_4x.weight": (5120, 16, 4, 8, 8), "trainable_cond_mask.weight": (3, 5120),
        "cond_encoder.weight": (5120, 16, 1, 2, 2),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    extras = [k for k in sd if not k.startswith("blocks.") and k.split(".")[0] not in
              ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head")]
    assert len(extras) == 165


def _reference_rope(x, pos, max_len=45000):
    """The reference's arithmetic: complex128 table, multipliers rounded to complex32, float64 rotation."""
    d = x.shape[-1]
    c = d // 2
    split = [c - 2 * (c // 3), c // 3, c // 3]
    table = torch.cat([rope_params(max_len, 2 * s) for s in split], dim=1).split(split, dim=1)
    cols = []
    for axis, part in enumerate(table):
        p = pos[:, axis]
        f = part[p.abs()]
        cols.append(torch.where((p < 0)[:, None], f.conj(), f))
    f = torch.cat(cols, dim=1)
    f = torch.complex(f.real.half().double(), f.imag.half().double())  # fp16 rounding of the table
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * f[None, :, None]).flatten(-2).float().to(x.dtype)


@pytest.mark.parametrize("d", [128, 32])
def test_rope_matches_the_reference_bit_for_bit_in_bf16(d):
    g = torch.Generator().manual_seed(1)
    pos = torch.cat([grid_positions(range(40, 43), range(5), range(7)),
                     grid_positions([-19, -4], strided(11, 3), strided(6, 2))])
    x = (torch.randn(2, pos.shape[0], 3, d, generator=g) * 4).to(torch.bfloat16)
    table = RopeTable.build(d)
    cos, sin = table.gather(pos)
    assert torch.equal(rope_apply(x, cos, sin), _reference_rope(x, pos))
    x32 = torch.randn(1, pos.shape[0], 2, d, generator=g)
    torch.testing.assert_close(rope_apply(x32, cos, sin), _reference_rope(x32, pos), rtol=0, atol=2e-6)


def test_rope_split_and_strided_positions():
    assert rope_pairs(128) == (22, 21, 21)
    assert strided(44, 22) == list(range(0, 42, 2)) + [43]
    assert strided(44, 11) == [0, 4, 8, 12, 17, 21, 25, 30, 34, 38, 43]
    pos = FramePackMotioner.positions(88, 48)
    assert pos.shape[0] == 1056 + 264 + 264                   # + 1056 ref tokens = the 2640-token sink
    assert sorted(set(pos[:, 0].tolist())) == [-19, -14, -9, -4, -3, -1]
    assert (pos[:, 1] <= 43).all() and (pos[:, 2] <= 23).all()


class RingKV:
    """A minimal ring cache with the model's interface (the production caches live in lowvram.runtime.kv_cache)."""

    def __init__(self, layers, cap, h, d):
        self.k = torch.zeros(layers, 1, cap, h, d)
        self.v = torch.zeros_like(self.k)
        self.cap = cap

    def begin_forward(self, start, n):
        self.s, self.n = start % self.cap, n
        self.end = self.cap if start >= self.cap else start + n

    def update(self, i, k, v):
        self.k[i, :, self.s:self.s + self.n] = k
        self.v[i, :, self.s:self.s + self.n] = v
        return self.k[i, :, :self.end], self.v[i, :, :self.end]

    def done(self, i):
        pass


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    model = build_model(cfg, "meta")
    model.load_state_dict({k: v.float() for k, v in tiny_dit_state_dict(cfg, seed=3).items()}, assign=True)
    g = torch.Generator().manual_seed(7)
    h, w = 16, 16
    ctx = model.embed_text([torch.randn(5, cfg.text_dim, generator=g)])
    sink = model.prefill_sink(torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g), ctx)
    return model, ctx, sink, g, (h, w)


def _step(model, ctx, sink, kv, x, audio, start_frame, d=10, t=857.6923):
    return model(x, torch.full((1, 3), t), ctx, audio, kv, sink, start_frame=start_frame, ref_shift=d)


def _new_kv(model, hw):
    cfg = model.cfg
    return RingKV(cfg.num_layers, 12 * (hw[0] // 2) * (hw[1] // 2), cfg.num_heads, cfg.head_dim)


def test_sink_holds_unroped_keys_of_the_conditioning_tokens(tiny):
    model, ctx, sink, g, (h, w) = tiny
    ref, mot = torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g)
    s = model.prefill_sink(ref, mot, ctx)
    assert s.n_ref == (h // 2) * (w // 2) and s.pos.shape[0] == s.k[0].shape[1]
    assert (s.pos[: s.n_ref, 0] == 30).all()
    # layer 0's keys by hand: tokens + mask ids 1/2, LN, t = 0 modulation, k projection, RMS norm, no RoPE
    x = torch.cat([model.patch_embedding(ref).flatten(2).transpose(1, 2), model.frame_packer(mot)], dim=1)
    ids = torch.tensor([1] * s.n_ref + [2] * (x.shape[1] - s.n_ref))
    x = x + model.trainable_cond_mask(ids)
    _, e0 = model._time(torch.zeros(1, 1))
    blk = model.blocks[0]
    shift, scale = (blk.modulation[0, 0] + e0[0, 0, 0]), (blk.modulation[0, 1] + e0[0, 0, 1])
    hmod = blk.norm1(x) * (1 + scale) + shift
    k = blk.self_attn.norm_k(blk.self_attn.k(hmod)).view(1, x.shape[1], model.cfg.num_heads, -1)
    torch.testing.assert_close(s.k[0], k, rtol=1e-5, atol=1e-5)


def test_streaming_is_deterministic_noncausal_and_caches_roped_keys(tiny):
    model, ctx, sink, g, hw = tiny
    x = torch.randn(1, 16, 3, *hw, generator=g)
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    kv1, kv2 = _new_kv(model, hw), _new_kv(model, hw)
    a = _step(model, ctx, sink, kv1, x, audio, 0)
    b = _step(model, ctx, sink, kv2, x, audio, 0)
    assert torch.equal(a, b)
    n = a.shape[2] * (hw[0] // 2) * (hw[1] // 2)
    assert kv1.k[:, :, n:].abs().sum() == 0 and kv1.k[:, :, :n].abs().sum() > 0
    # non-causal inside a block: the last frame's input changes the first frame's output
    x2 = x.clone()
    x2[:, :, 2] += 1
    c = _step(model, ctx, sink, _new_kv(model, hw), x2, audio, 0)
    assert not torch.allclose(a[:, :, 0], c[:, :, 0])
    # layer 0's cache holds this block's keys roped at its positions: rebuild them by hand
    tok = model.patch_embedding(x).flatten(2).transpose(1, 2) + model.cond_encoder.bias + model.trainable_cond_mask.weight[0]
    _, e0 = model._time(torch.full((1, 1), 857.6923))
    blk = model.blocks[0]
    hmod = blk.norm1(tok) * (1 + blk.modulation[0, 1] + e0[0, 0, 1]) + blk.modulation[0, 0] + e0[0, 0, 0]
    k = blk.self_attn.norm_k(blk.self_attn.k(hmod)).view(1, n, model.cfg.num_heads, -1)
    cos, sin = model.rope.gather(grid_positions(range(0, 3), range(hw[0] // 2), range(hw[1] // 2)))
    torch.testing.assert_close(kv1.k[0, :, :n], rope_apply(k, cos, sin), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kv1.k[0, :, :n], k, atol=1e-3)


def test_history_and_audio_and_rolling_sink_shift_change_the_output(tiny):
    model, ctx, sink, g, hw = tiny
    x = torch.randn(1, 16, 3, *hw, generator=g)
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    fresh = _step(model, ctx, sink, _new_kv(model, hw), x, audio, 3)
    kv = _new_kv(model, hw)
    _step(model, ctx, sink, kv, torch.randn(1, 16, 3, *hw, generator=g), audio, 0)
    after = _step(model, ctx, sink, kv, x, audio, 3)
    assert not torch.allclose(fresh, after)                       # the window holds block 0
    other_audio = _step(model, ctx, sink, _new_kv(model, hw), x, audio * 2 + 1, 3)
    assert not torch.allclose(fresh, other_audio)
    # ref position max(30, n + d): the same for every d while n + d <= 30, different after
    same = [_step(model, ctx, sink, _new_kv(model, hw), x, audio, 0, d=d) for d in (4, 30)]
    assert torch.equal(same[0], same[1])
    late = [_step(model, ctx, sink, _new_kv(model, hw), x, audio, 27, d=d) for d in (4, 30)]
    assert not torch.allclose(late[0], late[1])


def test_sink_positions_follow_the_rolling_formula():
    s = Sink(k=[], v=[], pos=torch.zeros(10, 3, dtype=torch.long), n_ref=4)
    s.pos[:4, 0] = 30
    s.pos[4:, 0] = -1
    for n, d, want in [(0, 30, 30), (12, 10, 30), (27, 4, 31), (60, 7, 67)]:
        p = s.positions(n, d)
        assert (p[:4, 0] == want).all() and (p[4:, 0] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_grid_equals_the_gathered_positions(dtype):
    """RopeTable.grid (slices of the table, no positions copied to the device) gives the bits of gather over
    grid_positions, at odd sizes and up to the table's end; outside the table it refuses."""
    table = RopeTable.build(32, max_len=97)
    for start, frames, rows, cols in [(0, 3, 8, 8), (5, 3, 7, 11), (94, 3, 1, 5), (40, 1, 13, 3)]:
        want = table.gather(grid_positions(range(start, start + frames), range(rows), range(cols)), dtype)
        got = table.grid(start, frames, rows, cols, dtype)
        assert all(w.dtype == dtype and torch.equal(w, x) for w, x in zip(want, got)), (start, frames, rows, cols)
    with pytest.raises(ValueError, match="outside the table"):
        table.grid(95, 3, 8, 8)


def test_sink_rope_tables_equal_the_gathered_positions(tiny):
    """Sink.rope_tables (the prefill's tables with the ref rows' time pairs set on the device) gives the bits of
    sink_rope_tables over positions(n, d), with the ref position at 30 and moved past it, also from a table
    grown past its first length and for a Sink built without tables; last_frame is their largest time."""
    from lowvram.model.rope import sink_rope_tables

    model, ctx, sink, g, hw = tiny
    small = RopeTable.build(model.cfg.head_dim, max_len=64)
    grown = RopeTable.build(model.cfg.head_dim, max_len=128)
    bare = Sink(k=sink.k, v=sink.v, pos=sink.pos, n_ref=sink.n_ref)
    assert sink.tables is not None and bare.tables is None
    for n, d in [(0, 30), (12, 10), (27, 4), (60, 7), (90, 30)]:
        rope = small if n + d < 64 else grown
        want = sink_rope_tables(rope, sink.positions(n, d))
        for s in (sink, bare):
            got = s.rope_tables(rope, n, d)
            assert all(torch.equal(w, x) and x.is_contiguous() for w, x in zip(want, got)), (n, d)
        assert sink.last_frame(n, d) == int(sink.positions(n, d)[:, 0].max()) == max(30, n + d)


def test_triton_attention_backend_matches_sdpa(tiny):
    """The two-segment kernel (interpreted on the CPU in CI) inside the model, against the SDPA path."""
    model, ctx, sink, g, hw = tiny
    x = torch.randn(1, 16, 3, *hw, generator=g)
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    outs = {}
    for backend in ("sdpa", "triton"):
        model.attention = backend
        kv = _new_kv(model, hw)
        _step(model, ctx, sink, kv, torch.randn(1, 16, 3, *hw, generator=torch.Generator().manual_seed(1)), audio, 0)
        outs[backend] = _step(model, ctx, sink, kv, x, audio, 3)
    model.attention = "sdpa"
    torch.testing.assert_close(outs["triton"], outs["sdpa"], rtol=2e-3, atol=2e-3)


def test_rope_table_grows_past_45000_positions_without_changing_earlier_entries(tiny):
    model, ctx, sink, g, hw = tiny
    small = model.rope
    model._rope = RopeTable.build(model.cfg.head_dim, 64)
    x = torch.randn(1, 16, 3, *hw, generator=g)
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    _step(model, ctx, sink, _new_kv(model, hw), x, audio, start_frame=90)   # needs positions >= 64
    assert model.rope.max_len == 128
    torch.testing.assert_close(model.rope.cos[:64], small.cos[:64], rtol=0, atol=0)
    model._rope = small


def test_triton8_attention_reads_the_8bit_step_cache(tiny):
    """attention="triton8": the step cache holds the 8-bit format and the 8-bit kernel reads it in place."""
    from lowvram.runtime.kv_cache import GpuKV8Cache

    model, ctx, sink, g, hw = tiny
    cfg = model.cfg
    xs = [torch.randn(1, 16, 3, *hw, generator=g) for _ in range(2)]
    audio = torch.randn(1, 3, cfg.audio_dim, 12, generator=g)
    outs = {}
    for backend in ("sdpa", "triton8"):
        model.attention = backend
        cap = 12 * (hw[0] // 2) * (hw[1] // 2)
        kv = GpuKV8Cache(cfg.num_layers, cap, 1, cfg.num_heads, cfg.head_dim, "cpu") if backend == "triton8" \
            else _new_kv(model, hw)
        outs[backend] = [_step(model, ctx, sink, kv, x, audio, 3 * b) for b, x in enumerate(xs)]
    model.attention = "sdpa"
    assert kv.layers[0].k.dtype == torch.int8
    for a, b in zip(outs["sdpa"], outs["triton8"]):
        sqnr = 10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum())
        assert sqnr > 25, f"{sqnr:.1f} dB"


@pytest.mark.parametrize("backend", ["sage", "fa4"])
def test_library_attention_gets_sdpas_joined_keys(tiny, monkeypatch, backend):
    """attention="sage" / "fa4": the same inputs as sdpa (q, and the window with the roped sink behind it) go to
    the library's function (lowvram.kernels.sage / flash4; CUDA only, so a recording stand-in computes sdpa here):
    every layer calls it once per forward, with the window of the first block and the sink, then two blocks."""
    from lowvram.model import attention as A

    model, ctx, sink, g, hw = tiny
    calls = []

    def fake(q, k, v):
        calls.append((q.shape[1], k.shape[1], v.shape[1]))
        return A.sdpa(q, k, v)
    monkeypatch.setattr(A.library_module(backend), A.LIBRARIES[backend][1], fake)
    xs = [torch.randn(1, 16, 3, *hw, generator=g) for _ in range(2)]
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    outs = {}
    for att in ("sdpa", backend):
        model.attention = att
        kv = _new_kv(model, hw)
        outs[att] = [_step(model, ctx, sink, kv, x, audio, 3 * b) for b, x in enumerate(xs)]
    model.attention = "sdpa"
    for a, b in zip(outs["sdpa"], outs[backend]):
        assert torch.equal(a, b)
    lq, ls = 3 * (hw[0] // 2) * (hw[1] // 2), sink.k[0].shape[1]
    assert calls == [(lq, ls + lq, ls + lq)] * model.cfg.num_layers + [(lq, ls + 2 * lq, ls + 2 * lq)] * model.cfg.num_layers


def test_int8_sink_halves_its_memory_and_keeps_the_velocity(tiny):
    from lowvram.kernels.rowquant import quantize_rows_int8
    from lowvram.metrics import sqnr_db

    model, ctx, sink, g, hw = tiny
    ref, mot = torch.randn(1, 16, 1, *hw, generator=g), torch.randn(1, 16, 19, *hw, generator=g)
    full = model.prefill_sink(ref, mot, ctx)
    s8 = model.prefill_sink(ref, mot, ctx, int8=True)
    for i in range(model.cfg.num_layers):
        # quantizing layer by layer during the pass = quantizing the finished sink
        for a, b in zip(s8.k[i] + s8.v[i], quantize_rows_int8(full.k[i]) + quantize_rows_int8(full.v[i])):
            assert torch.equal(a, b)
        k, v = s8.layer(i)
        assert k.dtype == full.k[i].dtype and k.shape == full.k[i].shape
        assert sqnr_db(full.k[i], k) > 38 and sqnr_db(full.v[i], v) > 38
    assert s8.nbytes() < 0.35 * full.nbytes()  # int8 + one fp32 scale per head and token, against fp32 here
    x = torch.randn(1, 16, 3, *hw, generator=g)
    audio = torch.randn(1, 3, model.cfg.audio_dim, 12, generator=g)
    a = _step(model, ctx, full, _new_kv(model, hw), x, audio, 0)
    b = _step(model, ctx, s8, _new_kv(model, hw), x, audio, 0)
    assert not torch.equal(a, b) and sqnr_db(a, b) > 30
