"""The sampler's exact sigmas and timesteps, and the block indexing of the streaming schedule."""

import torch

from lowvram.runtime.schedule import (BlockIndex, Work, block_of, euler_step, flow_sigmas, model_timesteps,
                                     output_frames, ref_shift, ticks)


def test_four_step_sigmas_and_timesteps_are_the_references():
    s = flow_sigmas(4)
    want = torch.tensor([1.0, 0.8576923, 0.60215056, 0.008928572, 0.0])
    torch.testing.assert_close(s, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(model_timesteps(s), torch.tensor([1000.0, 857.6923, 602.1506, 8.928572]),
                               rtol=0, atol=1e-4)
    assert s.dtype == torch.float32 and torch.all(s[1:] < s[:-1])
    assert len(flow_sigmas(8)) == 9 and flow_sigmas(8)[0] == 1.0


def test_euler_step_is_fp32_then_rounds_to_the_latent_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 5, generator=g).to(torch.bfloat16)
    v = torch.randn(16, 3, 4, 5, generator=g).to(torch.bfloat16)
    s = flow_sigmas(4)
    out = euler_step(x, v, s[1], s[2])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() + (s[2] - s[1]) * v.float()).to(torch.bfloat16))


def test_block_positions_and_frame_counts():
    assert BlockIndex(0, 0).start_frame == 0 and BlockIndex(0, 3).start_frame == 9
    assert BlockIndex(2, 1).start_frame == 27
    assert output_frames(1) == 45 and output_frames(3) == 141


def _pairs(ts):
    return [[(w.idx.clip * 4 + w.idx.block, w.step) for w in t] for t in ts]


def test_ticks_fill_run_steady_and_drain():
    ts = _pairs(ticks(6, 4))
    assert ts[:3] == [[(0, 0)], [(0, 1), (1, 0)], [(0, 2), (1, 1), (2, 0)]]  # fill
    assert ts[3] == [(0, 3), (1, 2), (2, 1), (3, 0)] and all(len(t) == 4 for t in ts[3:6])  # steady
    assert ts[-3:] == [[(3, 3), (4, 2), (5, 1)], [(4, 3), (5, 2)], [(5, 3)]]  # drain
    assert len(ts) == 6 + 4 - 1
    flat = [p for t in ts for p in t]
    assert sorted(flat) == [(b, i) for b in range(6) for i in range(4)]  # every pair once
    pos = {p: k for k, t in enumerate(ts) for p in t}
    for b in range(6):  # step i of block b after step i-1 of b and after step i of b-1
        for i in range(4):
            assert i == 0 or pos[(b, i)] > pos[(b, i - 1)]
            assert b == 0 or pos[(b, i)] > pos[(b - 1, i)]


def test_ticks_drain_at_the_online_decode_boundary():
    ts = _pairs(ticks(8, 4, drain_before=[4]))
    pos = {p: k for k, t in enumerate(ts) for p in t}
    assert pos[(4, 0)] > pos[(3, 3)]  # clip 1 starts after clip 0 is fully denoised (sink refresh)
    assert len(ts) == 2 * (4 + 3) and max(len(t) for t in ts) == 4
    assert [w.idx for w in next(iter(ticks(8, 4)))] == [BlockIndex(0, 0)] and block_of(5) == BlockIndex(1, 1)
    assert _pairs(ticks(3, 1)) == [[(0, 0)], [(1, 0)], [(2, 0)]] and Work(BlockIndex(0, 0), 0).step == 0


def test_ref_shift_depends_on_seed_clip_block_step_only():
    a = [ref_shift(7, BlockIndex(c, b), i) for c in range(3) for b in range(4) for i in range(4)]
    assert a == [ref_shift(7, BlockIndex(c, b), i) for c in range(3) for b in range(4) for i in range(4)]
    assert all(4 <= d <= 30 for d in a) and len(set(a)) > 10
    assert a != [ref_shift(8, BlockIndex(c, b), i) for c in range(3) for b in range(4) for i in range(4)]
