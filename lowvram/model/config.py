"""The DiT's architecture, read from the checkpoint's `config.json` (never hard-coded to 14B).

LiveAvatar builds `CausalWanModel_S2V` through diffusers' `from_pretrained`, so the keys of
config.json override the class defaults; keys the released file does not carry take the
class defaults below (docs/model.md §1.1, §8.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from lowvram.errors import CheckpointError

REQUIRED = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers")


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    ffn_dim: int
    freq_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    motion_frames: int = 73
    cond_dim: int = 16
    zero_timestep: bool = True
    num_audio_layers: int = 25  # wav2vec2 hidden states the audio encoder weighs (embedding + layers)
    rope_max_len: int = 45000  # LiveAvatar's table length (Wan2.2 uses 1024)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of the head dim given to (time, height, width): 44/42/42 for d = 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "DiTConfig":
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(f"{source} lacks the key(s) {', '.join(missing)}; "
                                  "re-download config.json of Wan2.2-S2V-14B")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known}
        for k in ("patch_size", "audio_inject_layers"):
            if k in kw:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        if cfg.dim % cfg.num_heads:
            raise CheckpointError(f"{source}: dim {cfg.dim} is not a multiple of num_heads {cfg.num_heads}")
        if any(i >= cfg.num_layers for i in cfg.audio_inject_layers):
            raise CheckpointError(f"{source}: audio_inject_layers {list(cfg.audio_inject_layers)} "
                                  f"reach past num_layers {cfg.num_layers}")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the checkpoint directory needs the config.json of "
                                  "Wan2.2-S2V-14B") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not readable JSON ({e}); re-download it") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a JSON object; re-download it")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def token_grid(height: int, width: int, cfg: DiTConfig, vae_stride: int = 8) -> tuple[int, int]:
    """Token rows and columns of one latent frame for a pixel size."""
    return height // vae_stride // cfg.patch_size[1], width // vae_stride // cfg.patch_size[2]
