"""FramePack motion tokens (`frame_packer`): the last 19 motion latents split 16 | 2 | 1 (oldest
first) and embedded at 4x, 2x and 1x spatio-temporal compression, with their fixed RoPE
positions at negative frames (docs/model.md §3.5, §4.2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from lowvram.model.rope import grid_positions, strided

BUCKETS = (1, 2, 16)  # latent frames of the post | 2x | 4x parts


class FramePackMotioner(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    @staticmethod
    def num_frames() -> int:
        return sum(BUCKETS)

    def forward(self, motion):  # motion: [B, C, T, h, w] latents, T >= 0 (zero-padded in front)
        b, c, t, h, w = motion.shape
        n = sum(BUCKETS)
        padded = motion.new_zeros(b, c, n, h, w)
        keep = min(n, t)
        if keep:
            padded[:, :, n - keep:] = motion[:, :, t - keep:]
        lat4, lat2, post = padded.split([BUCKETS[2], BUCKETS[1], BUCKETS[0]], dim=2)
        toks = [conv(lat).flatten(2).transpose(1, 2)
                for conv, lat in ((self.proj, post), (self.proj_2x, lat2), (self.proj_4x, lat4))]
        return torch.cat(toks, dim=1)  # [B, L_motion, dim]

    @staticmethod
    def positions(h: int, w: int) -> torch.Tensor:
        """RoPE positions [L_motion, 3] for latent size h x w (token grid h/2 x w/2)."""
        rows, cols = h // 2, w // 2
        post = grid_positions([-1], range(rows), range(cols))
        two = grid_positions([-3], strided(rows, h // 4), strided(cols, w // 4))
        four = grid_positions([-19, -14, -9, -4], strided(rows, h // 8), strided(cols, w // 8))
        return torch.cat([post, two, four])
