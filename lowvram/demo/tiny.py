"""The tiny checkpoint: every file of the real layout (docs/model.md §2.1) with tiny dimensions and seeded
random weights, written in seconds on a CPU. Tests, `lowvram demo` and tools/make_tiny_checkpoint.py
use it.

Layout written under `root`: `Wan2.2-S2V-14B/` (config.json, an index and two shards, the T5 .pth
with Wan's key names, google/umt5-xxl/, Wan2.1_VAE.pth, wav2vec2-large-xlsr-53-english/) and
`LiveAvatar/liveavatar.safetensors` (a PEFT-format LoRA), as the reference's `ckpt/` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowvram.constants import INDEX_FILE, VAE_FILE
from lowvram.model.config import DiTConfig

TINY_CONFIG = {
    "_class_name": "WanModel_S2V", "model_type": "s2v",
    "dim": 64, "ffn_dim": 128, "freq_dim": 32, "num_heads": 2, "num_layers": 4,
    "in_dim": 16, "out_dim": 16, "text_dim": 32, "text_len": 512, "patch_size": [1, 2, 2],
    "eps": 1e-6, "audio_dim": 32, "num_audio_token": 4, "audio_inject_layers": [0, 2, 3],
    "motion_frames": 73, "cond_dim": 16, "zero_timestep": True, "enable_adain": True,
    "adain_mode": "attn_norm", "enable_framepack": True, "enable_motioner": False,
    "framepack_drop_mode": "padd", "add_last_motion": True, "zero_init": True,
    "qk_norm": True, "cross_attn_norm": True, "window_size": [-1, -1],
}
TINY_AUDIO_LAYERS = 3  # wav2vec2 hidden states (2 layers + embedding); read back from the weight's shape


def tiny_config() -> DiTConfig:
    return DiTConfig.from_dict({**TINY_CONFIG, "num_audio_layers": TINY_AUDIO_LAYERS})


def tiny_dit_state_dict(cfg: DiTConfig, seed: int = 0) -> dict:
    """Seeded random weights with magnitudes that keep every path of the model active."""
    from lowvram.model.dit import LiveAvatarDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LiveAvatarDiT(cfg)
        sd = model.state_dict()
        g = torch.Generator().manual_seed(seed + 1)
        for k, v in sd.items():
            if k.endswith("modulation") or k.startswith("trainable_cond_mask") or k.endswith("padding_tokens"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.2)
            elif k.endswith("casual_audio_encoder.weights"):
                v.copy_(torch.randn(v.shape, generator=g))
            elif k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
            elif k.endswith(".bias"):
                v.copy_(0.05 * torch.randn(v.shape, generator=g))
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_tiny_dit(ckpt_dir: Path, seed: int = 0) -> dict:
    """config.json + index + two shards; returns {key: shape}."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    sd = tiny_dit_state_dict(tiny_config(), seed)
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-0000{len(halves)}.safetensors"
        save_file({k: sd[k] for k in part}, str(ckpt_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (ckpt_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2))
    return {k: tuple(v.shape) for k, v in sd.items()}


def write_tiny_checkpoint(root, seed: int = 0) -> tuple[Path, Path]:
    """Write the whole tiny checkpoint under root; returns (ckpt_dir, lora_path)."""
    from lowvram.demo.components import write_tiny_lora, write_tiny_t5, write_tiny_vae, write_tiny_wav2vec2

    root = Path(root)
    ckpt = root / "Wan2.2-S2V-14B"
    shapes = write_tiny_dit(ckpt, seed)
    write_tiny_t5(ckpt, seed=seed, dim=TINY_CONFIG["text_dim"])
    write_tiny_wav2vec2(ckpt, seed=seed, hidden=TINY_CONFIG["audio_dim"], layers=TINY_AUDIO_LAYERS - 1)
    write_tiny_vae(ckpt / VAE_FILE, seed=seed)
    lora = root / "LiveAvatar" / "liveavatar.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_lora(lora, shapes, rank=4, seed=seed)
    return ckpt, lora
