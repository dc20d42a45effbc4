"""The sampler's exact sigmas and timesteps, and the block indexing of the streaming schedule."""

import torch

from lowvram.runtime.schedule import BlockIndex, euler_step, flow_sigmas, model_timesteps, output_frames


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
