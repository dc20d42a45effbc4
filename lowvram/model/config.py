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
MAX_INT = 2**31 - 1  # larger sizes are not a model this code can build
_TUPLES = {"patch_size": 3, "audio_inject_layers": None}  # key -> required length (None: any)


def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_INT


def _check_types(kw: dict, source: str) -> None:
    """Every known key must hold what the model needs; the message names the file, the key and the type."""
    types = {f.name: f.type for f in fields(DiTConfig)}
    for key, v in kw.items():
        kind = types[key]
        if key in _TUPLES:
            n, low = _TUPLES[key], 1 if key == "patch_size" else 0
            ok = isinstance(v, list) and (n is None or len(v) == n) and all(_is_int(x, low) for x in v)
            want = (f"a list of {n} positive integers" if n else "a list of layer indices (integers >= 0)")
        elif kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
            want = "a positive number"
        else:
            ok, want = _is_int(v, 1), f"an integer between 1 and {MAX_INT}"
        if not ok:
            raise CheckpointError(f"{source}: key {key!r} must be {want}, got {json.dumps(v)[:60]} "
                                  f"({_json_type(v)}); fix it or re-download config.json of Wan2.2-S2V-14B")


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
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in raw.items() if k in known}
        _check_types(kw, source)
        for k in _TUPLES:
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
