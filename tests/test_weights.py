"""Checkpoint discovery, meta-device loading with the LoRA merged, memory bound, and bad checkpoints."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowvram.constants import INDEX_FILE
from lowvram.errors import CheckpointError
from lowvram.io.weights import discover, load_dit


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tiny_checkpoint_loads_with_the_lora_merged(tiny_ckpt):
    ckpt, lora = tiny_ckpt
    base = load_dit(ckpt, dtype=torch.float32)
    merged = load_dit(ckpt, lora=lora, dtype=torch.float32)
    assert base.cfg.num_audio_layers == 3          # read from casual_audio_encoder.weights' shape
    key = "blocks.1.cross_attn.v.weight"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata() or {}
        a = f.get_tensor(f"base_model.model.{key[:-7]}.lora_A.default.weight").float()
        b = f.get_tensor(f"base_model.model.{key[:-7]}.lora_B.default.weight").float()
    alpha = float(meta.get("lora_alpha", 64.0))
    w0 = base.state_dict()[key]
    want = (w0.to(torch.bfloat16).float() + (b @ a) * (alpha / a.shape[0])).to(torch.bfloat16).float()
    torch.testing.assert_close(merged.state_dict()[key], want, rtol=0, atol=0)
    untouched = "blocks.0.norm3.weight"
    assert torch.equal(base.state_dict()[untouched], merged.state_dict()[untouched])
    assert not any(p.is_meta for p in merged.parameters())


def test_missing_files_are_listed_in_one_error(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path / "c")
    (ckpt / "Wan2.1_VAE.pth").unlink()
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        discover(ckpt)
    msg = str(e.value)
    assert "Wan2.1_VAE.pth" in msg and shard.name in msg and "hf download Wan-AI/Wan2.2-S2V-14B --local-dir" in msg
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_truncated_shard_names_the_file(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path / "c")
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_dit(ckpt, dtype=torch.float32)


def test_wrong_shape_missing_config_key_and_foreign_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path / "c")
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*"))[0]
    with safe_open(str(shard), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(k for k in sd if k.endswith(".weight") and sd[k].ndim == 2)[0]
    bad = dict(sd, **{key: torch.zeros(3, 5, dtype=torch.bfloat16)})
    save_file(bad, str(shard))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_dit(ckpt, dtype=torch.float32)
    sd["not_a_wan_key.weight"] = torch.ones(2)
    save_file(sd, str(shard))
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["not_a_wan_key.weight"] = shard.name
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not_a_wan_key"):
        load_dit(ckpt, dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_heads"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_heads"):
        discover(ckpt).dit_config()


def test_lora_that_does_not_fit_is_refused(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    bad = tmp_path / "bad.safetensors"
    save_file({"base_model.model.blocks.0.self_attn.q.lora_A.default.weight": torch.randn(4, 7),
               "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": torch.randn(64, 4)}, str(bad))
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q"):
        load_dit(ckpt, lora=bad, dtype=torch.float32)


def _write_synthetic(root):
    """A checkpoint of the real key layout at dim 1024 x 12 layers (~350 MB of bf16)."""
    from lowvram.demo.tiny import TINY_CONFIG
    from lowvram.model.config import DiTConfig
    from lowvram.model.dit import build_model

    raw = dict(TINY_CONFIG, dim=1024, ffn_dim=3072, num_heads=8, num_layers=12, text_dim=64, audio_dim=64,
               freq_dim=64, audio_inject_layers=[0, 11])
    cfg = DiTConfig.from_dict(dict(raw, num_audio_layers=3))
    shapes = {k: v.shape for k, v in build_model(cfg, "meta").state_dict().items()}
    keys = sorted(shapes)
    g = torch.Generator().manual_seed(0)
    wmap, total = {}, 0
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]]):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        sd = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in part}
        total += sum(t.numel() * 2 for t in sd.values())
        save_file(sd, str(root / name))
        wmap.update({k: name for k in part})
    (root / INDEX_FILE).write_text(json.dumps({"weight_map": wmap}))
    (root / "config.json").write_text(json.dumps(raw))
    for f in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (root / f).write_bytes(b"x")
    for d in ("google/umt5-xxl", "wav2vec2-large-xlsr-53-english"):
        (root / d).mkdir(parents=True)
    return total


def test_loading_keeps_one_copy_in_ram(tmp_path):
    """Peak RSS of a process loading a ~350 MB checkpoint grows by about one copy of the weights."""
    total = _write_synthetic(tmp_path)
    assert total > 300e6
    script = textwrap.dedent("""
        import json, sys, psutil, torch
        from lowvram.io.weights import load_dit
        from lowvram.model.dit import build_model
        from lowvram.demo.tiny import tiny_config
        build_model(tiny_config(), "meta")  # one-time import of torch's meta kernels (~150 MB) before the baseline
        base = psutil.Process().memory_info().rss
        model = load_dit(sys.argv[1], device="cpu", dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) > 0
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))  # this process's own peak
        print(json.dumps({"base": base, "peak": int(hwm.split()[1]) * 1024}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    assert grown < 1.3 * total, f"loading grew RSS by {grown / 1e6:.0f} MB for {total / 1e6:.0f} MB of weights"
