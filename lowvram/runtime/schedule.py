"""The 4-step DMD sampler and the streaming schedule (docs/model.md §3.1, §3.7, §3.8, §5).

Sigmas follow diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3) with
set_timesteps(steps): for 4 steps they are [1, 0.8576923, 0.60215056, 0.008928572, 0]; the model
is fed t = 1000 sigma (float32); the Euler update runs in fp32 and rounds x to the latent dtype.

Timestep forcing: step i of block b needs only step i-1 of block b (its input) and step i of block b-1
(through step cache i), so at tick tau the pairs (block tau-i, step i) can all run. `ticks` writes that
schedule once, as data: the pipeline fills over steps-1 ticks, runs `steps` pairs per tick, then drains;
a drain point (the online-decode sink refresh at clip 1) ends one such segment and starts the next.
The frames depend on the seed and the inputs only, never on the schedule: `ref_shift` draws the
rolling-sink shift d of (clip, block, step) from the seed alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from lowvram.constants import BLOCKS_PER_CLIP, CLIP_FRAMES, DROPPED_FRAMES, FRAMES_PER_BLOCK, LATENT_FRAMES

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


@dataclass(frozen=True)
class Work:
    """One DiT forward of the schedule: denoising step `step` of block `idx`."""

    idx: BlockIndex
    step: int


def block_of(g: int, blocks_per_clip: int = BLOCKS_PER_CLIP) -> BlockIndex:
    """The block of global index g (clip-major)."""
    return BlockIndex(g // blocks_per_clip, g % blocks_per_clip, blocks_per_clip)


def ticks(num_blocks: int, steps: int, drain_before: Sequence[int] = (),
          blocks_per_clip: int = BLOCKS_PER_CLIP) -> Iterator[list[Work]]:
    """The timestep-forcing schedule of `num_blocks` blocks (global, clip-major) x `steps` steps.

    Yields one list per tick: the pairs (block g - i, step i) that can run together, oldest block first.
    drain_before: global block indices whose step 0 waits until the previous block's last step is done
    (the pipeline drains there and fills again). A block's last step is in the tick after which it can
    be decoded."""
    cuts = sorted({0, num_blocks, *(g for g in drain_before if 0 < g < num_blocks)})
    for a, b in zip(cuts, cuts[1:]):
        n = b - a
        for tau in range(n + steps - 1):
            yield [Work(block_of(a + tau - i, blocks_per_clip), i) for i in reversed(range(steps)) if 0 <= tau - i < n]


def ref_shift(seed: int, idx: BlockIndex, step: int) -> int:
    """The rolling-sink shift d in [4, 30] of (clip, block, step), drawn from the seed alone (the reference
    draws it from Python's unseeded RNG on every DiT call)."""
    return random.Random(f"lowvram-ref-shift/{seed}/{idx.clip}/{idx.block}/{step}").randint(4, 30)
