"""Synthetic bf16 DiT checkpoints with the real Wan2.2-S2V key names (docs/model.md §2.2), for tests and benchmarks.

`dit_state_shapes(cfg)` lists every state-dict key with its shape (1260 keys for the 14B config);
`write_checkpoint` writes config.json, the index json and N shards of seeded random weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowvram.constants import INDEX_FILE
from lowvram.model.config import DiTConfig


def _attn(prefix: str, dim: int, shapes: dict) -> None:
    for p in "qkvo":
        shapes[f"{prefix}.{p}.weight"] = (dim, dim)
        shapes[f"{prefix}.{p}.bias"] = (dim,)
    shapes[f"{prefix}.norm_q.weight"] = (dim,)
    shapes[f"{prefix}.norm_k.weight"] = (dim,)


def dit_state_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """Key -> shape of the S2V DiT's state dict. The audio encoder's conv widths follow the 14B ratios
    (conv1_local dim·tokens/4, conv1_global dim/4, conv2 dim/2)."""
    d, f, pt = cfg.dim, cfg.ffn_dim, tuple(cfg.patch_size)
    s: dict[str, tuple] = {
        "patch_embedding.weight": (d, cfg.in_dim, *pt), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (cfg.out_dim * math.prod(pt), d), "head.head.bias": (cfg.out_dim * math.prod(pt),),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        _attn(f"{b}.self_attn", d, s)
        s[f"{b}.norm3.weight"], s[f"{b}.norm3.bias"] = (d,), (d,)
        _attn(f"{b}.cross_attn", d, s)
        s[f"{b}.ffn.0.weight"], s[f"{b}.ffn.0.bias"] = (f, d), (f,)
        s[f"{b}.ffn.2.weight"], s[f"{b}.ffn.2.bias"] = (d, f), (d,)
        s[f"{b}.modulation"] = (1, 6, d)
    h, a = d // 4, cfg.audio_dim
    enc = "casual_audio_encoder.encoder"
    s.update({
        "cond_encoder.weight": (d, cfg.cond_dim, *pt), "cond_encoder.bias": (d,),
        "trainable_cond_mask.weight": (3, d),
        "casual_audio_encoder.weights": (1, cfg.num_audio_layers, 1, 1),
        f"{enc}.conv1_local.conv.weight": (cfg.num_audio_token * h, a, 3),
        f"{enc}.conv1_local.conv.bias": (cfg.num_audio_token * h,),
        f"{enc}.conv1_global.conv.weight": (h, a, 3), f"{enc}.conv1_global.conv.bias": (h,),
        f"{enc}.conv2.conv.weight": (2 * h, h, 3), f"{enc}.conv2.conv.bias": (2 * h,),
        f"{enc}.conv3.conv.weight": (d, 2 * h, 3), f"{enc}.conv3.conv.bias": (d,),
        f"{enc}.final_linear.weight": (d, d), f"{enc}.final_linear.bias": (d,),
        f"{enc}.padding_tokens": (1, 1, 1, d),
    })
    for k in range(len(cfg.audio_inject_layers)):
        _attn(f"audio_injector.injector.{k}", d, s)
        s[f"audio_injector.injector_adain_layers.{k}.linear.weight"] = (2 * d, d)
        s[f"audio_injector.injector_adain_layers.{k}.linear.bias"] = (2 * d,)
    for name, k in (("proj", (1, 2, 2)), ("proj_2x", (2, 4, 4)), ("proj_4x", (4, 8, 8))):
        s[f"frame_packer.{name}.weight"] = (d, cfg.in_dim, *k)
        s[f"frame_packer.{name}.bias"] = (d,)
    return s


def random_tensor(shape: tuple, g: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in) for 2-D and higher tensors, N(0, 0.02²) for vectors."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 0
    std = fan_in ** -0.5 if fan_in > 1 else 0.02
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_checkpoint(ckpt_dir, shapes: dict[str, tuple], config: dict, num_shards: int = 2, seed: int = 0,
                     dtype=torch.bfloat16) -> dict[str, str]:
    """Write config.json, the index json and `num_shards` safetensors shards; returns the weight_map."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(shapes)
    per = -(-len(keys) // num_shards)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: random_tensor(shapes[k], g, dtype) for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(ckpt_dir / name))
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: name for k in part})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return weight_map
