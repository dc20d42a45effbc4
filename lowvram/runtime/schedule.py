"""The 4-step DMD sampler and the streaming schedule (docs/model.md §3.1, §5).

Sigmas follow diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3) with
set_timesteps(steps): for 4 steps they are [1, 0.8576923, 0.60215056, 0.008928572, 0]; the model
is fed t = 1000 sigma (float32); the Euler update runs in fp32 and rounds x to the latent dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowvram.constants import CLIP_FRAMES, DROPPED_FRAMES, FRAMES_PER_BLOCK, LATENT_FRAMES

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """float32 sigmas of length steps + 1 (the last is 0)."""
    train = torch.from_numpy(np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    train = _shift(train / NUM_TRAIN_TIMESTEPS, shift)
    smax, smin = train[0].item(), train[-1].item()
    ts = np.linspace(smax * NUM_TRAIN_TIMESTEPS, smin * NUM_TRAIN_TIMESTEPS, steps)
    sig = torch.from_numpy(_shift(ts / NUM_TRAIN_TIMESTEPS, shift)).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """t fed to the model: sigma * 1000 in float32, one per step."""
    return sigmas[:-1] * NUM_TRAIN_TIMESTEPS


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x <- x + (sigma_next - sigma) v in fp32, rounded to x's dtype."""
    return (x.float() + (sigma_next - sigma).float() * v.float()).to(x.dtype)


@dataclass(frozen=True)
class BlockIndex:
    clip: int
    block: int                # 0..3 within the clip
    blocks_per_clip: int = LATENT_FRAMES // FRAMES_PER_BLOCK

    @property
    def start_frame(self) -> int:
        """Absolute latent frame index of the block's first frame (the RoPE time position)."""
        return (self.clip * self.blocks_per_clip + self.block) * FRAMES_PER_BLOCK


def output_frames(num_clips: int) -> int:
    return CLIP_FRAMES * num_clips - DROPPED_FRAMES
