"""A tiny decoder for Wan 2.1 latents (`--vae tiny`): the public TAEHV design, decoder only.

TAEHV (github.com/madebyollin/taehv, `taehv.py`; its users download `taew2_1.pth` for Wan 2.1
and Wan 2.2-14B) is a 2-D conv net with one frame of memory per block. Facts of the design
relied on here (taehv.py and README.md at commit 1f14a56):
- decoder, as an nn.Sequential (indices are the state-dict keys):
  0 Clamp tanh(x/3)·3 | 1 conv3x3 16→256 | 2 ReLU | 3-5 MemBlock(256) | 6 Upsample ×2 |
  7 TGrow(256, 1) | 8 conv3x3 256→128 (no bias) | 9-11 MemBlock(128) | 12 Upsample ×2 |
  13 TGrow(128, 2) | 14 conv3x3 128→64 (no bias) | 15-17 MemBlock(64) | 18 Upsample ×2 |
  19 TGrow(64, 2) | 20 conv3x3 64→64 (no bias) | 21 ReLU | 22 conv3x3 64→3
  (taew2_1: 16 latent channels, patch size 1, time upscale (False, True, True), space ×2 ×3).
- MemBlock(x, past) = ReLU(conv(cat[x, past]) + x), conv = conv3x3 2n→n, ReLU, conv3x3, ReLU,
  conv3x3; `past` is the block's input one frame earlier, zeros for a video's first frame.
- TGrow(n, s): 1x1 conv n → n·s (no bias); frame i's channels [j·n, (j+1)·n) become frame s·i + j.
- Upsample is nearest-neighbour. The output is clamped to [0, 1] (mapped to [-1, 1] here).
- Time: each latent gives t_upscale = 4 frames, and the first t_upscale - 1 = 3 frames of a
  video are dropped, so n latents give 4n - 3 frames, aligned with Wan's VAE (1 + 4(n - 1)).
- Latent scaling: none. TAEHV decodes exactly what the diffusion model produces (the normalised
  latents that `StreamingDecoder.decode` takes), README "How do I use TAEHV with Diffusers".
- Decoding all frames at once ("parallel") and frame by frame ("sequential") are the same maths.
- Weights file: a state dict with `decoder.*` and `encoder.*` keys (.pth; the repo also has
  safetensors copies). A TGrow weight with more rows than the model needs is cut to its last rows
  (the public loader's `patch_tgrow_layers`).
Quality is unmeasured in this repository: no TAEHV weights were available where it was written.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowvram.errors import CheckpointError, LowvramError

TAEHV_FILES = ("taew2_1.safetensors", "taew2_1.pth")  # looked for in the checkpoint directory
TAEHV_URL = "https://github.com/madebyollin/taehv"
WIDTHS = (256, 128, 64, 64)


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        # x, past: [N·T, C, H, W] (past: each frame's predecessor)
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N·T, C, H, W] -> [N·T·stride, C, H, W]
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class Upsample(nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale == 1 else F.interpolate(x, scale_factor=self.scale, mode="nearest")


class TAEHVDecoder(nn.Module):
    """The TAEHV decoder: latents [B, z, n, h, w] (normalised) -> frames [B, 3, 4n - 3, 8h, 8w] in [-1, 1]."""

    def __init__(self, latent_channels: int = 16, time_upscale=(False, True, True),
                 space_upscale=(True, True, True)) -> None:
        super().__init__()
        n = WIDTHS
        layers: list[nn.Module] = [Clamp(), conv(latent_channels, n[0]), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(n[i], n[i]), MemBlock(n[i], n[i]), MemBlock(n[i], n[i]),
                       Upsample(2 if space_upscale[i] else 1), TGrow(n[i], 2 if time_upscale[i] else 1),
                       conv(n[i], n[i + 1], bias=False)]
        layers += [nn.ReLU(), conv(n[3], 3)]
        self.decoder = nn.Sequential(*layers)
        self.latent_channels = latent_channels
        self.t_upscale = 2 ** sum(bool(t) for t in time_upscale)
        self.space_upscale = 2 ** sum(bool(s) for s in space_upscale)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The whole video at once (the streaming decoder on a fresh state)."""
        return TinyStreamingDecoder(self).decode(z)


class TinyStreamingDecoder:
    """Streams TAEHV block by block, with `StreamingDecoder`'s calls: decode(z) and reset().

    Each MemBlock keeps its last input frame across calls. The first call after a reset yields
    4n - 3 frames (the design's first 3 are dropped), later calls 4n; `group` latents run per step
    (1: any split of a sequence gives the bits of its whole decode).
    """

    def __init__(self, tae: TAEHVDecoder, group: int = 1) -> None:
        if group < 1:
            raise LowvramError(f"TinyStreamingDecoder group must be >= 1 latent frames, got {group}")
        self.vae = tae  # the name OverlappedDecoder and the engine look for
        self.group = group
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next latent is decoded as the first of a new video."""
        self.memory: dict[int, torch.Tensor] = {}
        self.to_drop = self.vae.t_upscale - 1

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors the decoder carries from one call to the next (each MemBlock's last input)."""
        return list(self.memory.values())

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, g, z, h, w] -> [B, g·t_upscale, 3, H, W] raw decoder output
        b, t = x.shape[:2]
        x = x.flatten(0, 1)
        for i, layer in enumerate(self.vae.decoder):
            if isinstance(layer, MemBlock):
                x5 = x.unflatten(0, (b, t))
                prev = self.memory.get(i)
                prev = torch.zeros_like(x5[:, :1]) if prev is None else prev
                past = torch.cat([prev, x5[:, :-1]], 1).flatten(0, 1)  # each frame's predecessor
                self.memory[i] = x5[:, -1:].clone()
                x = layer(x, past)
            else:
                x = layer(x)
                if isinstance(layer, TGrow):
                    t *= layer.stride
        return x.unflatten(0, (b, t))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, z, n, h, w] normalised latents -> frames [B, 3, F, 8h, 8w] float32 in [-1, 1]."""
        tae = self.vae
        if z.ndim != 5 or z.shape[1] != tae.latent_channels:
            raise LowvramError(f"TAEHV decode expects latents [B, {tae.latent_channels}, n, h, w], got {list(z.shape)}")
        x = z.to(device=tae.device, dtype=tae.dtype).transpose(1, 2)  # [B, n, z, h, w]
        outs = [self._step(x[:, i:i + self.group]) for i in range(0, x.shape[1], self.group)]
        frames = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [B, F, 3, H, W]
        drop = min(self.to_drop, frames.shape[1])
        self.to_drop -= drop
        frames = frames[:, drop:].transpose(1, 2).float().clamp_(0, 1)
        return frames.mul_(2).sub_(1).contiguous()  # [B, 3, F, H, W] in [-1, 1]


# ---------------------------------------------------------------- weights


def find_taehv_weights(ckpt_dir, path=None) -> Path:
    """The TAEHV file: `path` if given, else the first of TAEHV_FILES inside `ckpt_dir`."""
    if path is not None:
        return Path(path)
    for name in TAEHV_FILES:
        if (Path(ckpt_dir) / name).is_file():
            return Path(ckpt_dir) / name
    raise CheckpointError(f"--vae tiny needs the TAEHV weights for Wan 2.1: download taew2_1.pth from {TAEHV_URL} "
                          f"into {ckpt_dir}, or pass its path with --vae-path")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"TAEHV weights {path} do not exist; download taew2_1.pth from {TAEHV_URL}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file becomes a one-line user error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read TAEHV weights {path}: {first}; re-download taew2_1.pth from {TAEHV_URL}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"TAEHV weights {path} hold a {type(sd).__name__}, not a state dict of tensors; "
                              f"pass taew2_1.pth from {TAEHV_URL}")
    return sd


def _patch_tgrow(model: TAEHVDecoder, sd: dict) -> None:
    """A TGrow weight trained for a larger time stride: keep its last-timestep rows (as the public loader)."""
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd:
            rows = layer.conv.out_channels
            if sd[key].ndim == 4 and sd[key].shape[0] > rows and sd[key].shape[0] % rows == 0:
                sd[key] = sd[key][-rows:]


def load_taehv(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> TAEHVDecoder:
    """Load the decoder of a TAEHV file for Wan 2.1 latents (`taew2_1.pth` / `.safetensors`); encoder keys are ignored."""
    path = Path(path)
    sd = _read(path)
    other = [k for k in sd if not k.startswith(("decoder.", "encoder."))]
    sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    first = sd.get("decoder.1.weight")
    if first is None or first.ndim != 4 or other:
        raise CheckpointError(f"{path} is not a TAEHV decoder for Wan 2.1 (no decoder.1.weight conv"
                              f"{', keys ' + ', '.join(other[:3]) if other else ''}); pass taew2_1.pth from {TAEHV_URL}")
    if first.shape[1] != 16:
        raise CheckpointError(f"{path} decodes {first.shape[1]}-channel latents; Wan 2.1 (LiveAvatar) latents have 16 "
                              f"channels: use taew2_1.pth from {TAEHV_URL}")
    with torch.device("meta"):
        model = TAEHVDecoder(latent_channels=16)
    _patch_tgrow(model, sd)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        what = (f"{len(missing)} missing key(s) ({', '.join(missing[:3])})" if missing else
                f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])})" if unexpected else
                f"{wrong[0]} has shape {list(sd[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{path} does not match the TAEHV decoder for Wan 2.1: {what}; the *_super and other "
                              f"variants are other designs: pass taew2_1.pth from {TAEHV_URL}")
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
