"""LoRA reading (PEFT spellings, alpha sources), checking against base shapes, and the fp32 merge."""

import pytest
import torch
from safetensors.torch import save_file

from lowvram.demo.components import write_tiny_lora
from lowvram.demo.synthetic import dit_state_shapes
from lowvram.errors import CheckpointError, LowvramError
from lowvram.io.lora import LoraSet, check_alpha, lora_target_keys
from lowvram.model.config import DiTConfig

REAL = DiTConfig(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)
TINY = DiTConfig(dim=24, ffn_dim=40, freq_dim=8, num_heads=2, num_layers=2, text_dim=16, audio_dim=8,
                 audio_inject_layers=(0, 1), num_audio_layers=3)


@pytest.fixture(scope="module")
def tiny_shapes():
    return dit_state_shapes(TINY)


def test_real_key_list_has_1260_keys_and_448_peft_targets():
    shapes = dit_state_shapes(REAL)
    assert len(shapes) == 1260
    targets = lora_target_keys(shapes)
    assert len(targets) == 448
    assert "blocks.39.ffn.2.weight" in targets and "audio_injector.injector.11.o.weight" in targets
    assert "blocks.0.self_attn.norm_q.weight" not in targets  # ends with "norm_q", not ".q"
    assert not any(k.startswith(("text_embedding", "audio_injector.injector_adain")) for k in targets)
    # docs/model.md §2.3: rank 128 gives 676,331,520 LoRA parameters
    assert sum(128 * (shapes[k][0] + shapes[k][1]) for k in targets) == 676_331_520


@pytest.mark.parametrize("spelling", ["peft", "plain", "kohya"])
def test_spellings_load_to_the_same_targets(tmp_path, tiny_shapes, spelling):
    path = tmp_path / "l.safetensors"
    keys = write_tiny_lora(path, tiny_shapes, rank=3, seed=1, spelling=spelling, alpha=6.0)
    lora = LoraSet.load(path)
    assert sorted(lora.targets) == sorted(keys)
    assert len(keys) == 2 * 10 + 2 * 4
    assert lora.scale(keys[0]) == pytest.approx(2.0) and lora.alpha_source == "metadata"
    lora.check(tiny_shapes)


def test_merge_matches_fp32_math_and_keeps_dtype(tmp_path, tiny_shapes):
    path = tmp_path / "l.safetensors"
    write_tiny_lora(path, tiny_shapes, rank=5, seed=2, alpha=2.5)
    lora = LoraSet.load(path)
    g = torch.Generator().manual_seed(3)
    key = "blocks.1.ffn.0.weight"
    w = torch.randn(tiny_shapes[key], generator=g).bfloat16()  # [40, 24]
    merged = lora.merge(key, w)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        a = f.get_tensor("base_model.model.blocks.1.ffn.0.lora_A.default.weight").float()
        b = f.get_tensor("base_model.model.blocks.1.ffn.0.lora_B.default.weight").float()
    want = (w.float() + 0.5 * (b @ a)).bfloat16()
    assert merged.dtype == torch.bfloat16 and merged.shape == w.shape
    torch.testing.assert_close(merged, want, rtol=0, atol=0)
    assert not torch.equal(merged, w)
    # fp32 weights are merged without touching the input
    w32 = w.float()
    before = w32.clone()
    lora.merge(key, w32)
    assert torch.equal(w32, before)
    # a key that is not a target comes back unchanged
    bias = torch.randn(40, generator=g)
    assert lora.merge("blocks.1.ffn.0.bias", bias) is bias


def _pair_file(path, mods, r=2, metadata=None, extra=None, prefix="diffusion_model."):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for m, (o, i) in mods.items():
        sd[f"{prefix}{m}.lora_A.weight"] = torch.randn(r, i, generator=g)
        sd[f"{prefix}{m}.lora_B.weight"] = torch.randn(o, r, generator=g)
    sd.update(extra or {})
    save_file(sd, str(path), metadata=metadata)


def test_alpha_sources(tmp_path):
    p = tmp_path / "a.safetensors"
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5)}, r=4)
    assert LoraSet.load(p).scale("blocks.0.self_attn.q.weight") == pytest.approx(64 / 4)
    arg = LoraSet.load(p, alpha=8.0)
    assert arg.scale("blocks.0.self_attn.q.weight") == pytest.approx(2.0) and arg.alpha_source == "argument"
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5)}, r=4, metadata={"alpha": "2"})
    assert LoraSet.load(p, alpha=8.0).scale("blocks.0.self_attn.q.weight") == pytest.approx(0.5)
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5)}, r=4,
               extra={"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)})
    lora = LoraSet.load(p)
    assert lora.scale("blocks.0.self_attn.q.weight") == pytest.approx(0.25) and lora.alpha_source == "tensor"
    assert lora.summary()["rank"] == 4


def test_check_names_the_offending_key(tmp_path):
    p = tmp_path / "c.safetensors"
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5), "blocks.0.self_attn.k": (6, 5)})
    lora = LoraSet.load(p)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.k\.weight.*\[6, 7\]"):
        lora.check({"blocks.0.self_attn.q.weight": (6, 5), "blocks.0.self_attn.k.weight": (6, 7)})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.k\.weight.*does not have"):
        lora.check({"blocks.0.self_attn.q.weight": (6, 5)})
    with pytest.raises(CheckpointError, match="c.safetensors"):
        lora.check({"other.weight": (6, 5)})


def test_bad_files(tmp_path):
    p = tmp_path / "bad.safetensors"
    _pair_file(p, {"blocks.0.ffn.0": (6, 5)}, extra={"blocks.0.ffn.0.weight": torch.randn(6, 5)}, prefix="")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.0\.weight' is not a LoRA weight"):
        LoraSet.load(p)
    save_file({"x.lora_A.weight": torch.randn(2, 5)}, str(p))
    with pytest.raises(CheckpointError, match="no matching lora_B"):
        LoraSet.load(p)
    save_file({"x.lora_A.weight": torch.randn(2, 5), "x.lora_B.weight": torch.randn(6, 3)}, str(p))
    with pytest.raises(CheckpointError, match="rank-r pair"):
        LoraSet.load(p)
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        LoraSet.load(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        LoraSet.load(tmp_path / "nope.safetensors")
    _pair_file(p, {"m": (6, 5)}, metadata={"lora_alpha": "abc"})
    with pytest.raises(CheckpointError, match="not a number"):
        LoraSet.load(p)


@pytest.mark.parametrize("alpha", [-1.0, 0.0, -0.0, float("nan"), float("inf"), "abc"])
def test_bad_alpha_argument_is_refused_wherever_it_is_applied(tmp_path, alpha):
    p = tmp_path / "a.safetensors"
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5)}, r=4, metadata={"lora_alpha": "64"})
    with pytest.raises(LowvramError, match=r"--lora-alpha must be a positive number \(got ") as e:
        LoraSet.load(p, alpha=alpha)  # refused even when the file's metadata would win
    assert "\n" not in str(e.value)
    with pytest.raises(LowvramError, match="--lora-alpha must be a positive number"):
        check_alpha(alpha)  # the same check, for the commands to run before any work
    assert check_alpha(None) is None and check_alpha(16) == 16.0


@pytest.mark.parametrize("where", ["metadata", "tensor"])
@pytest.mark.parametrize("bad", ["-2", "0", "nan", "inf"])
def test_bad_alpha_in_the_file_is_refused(tmp_path, where, bad):
    p = tmp_path / "a.safetensors"
    if where == "metadata":
        _pair_file(p, {"m": (6, 5)}, metadata={"alpha": bad})
    else:
        _pair_file(p, {"m": (6, 5)}, extra={"diffusion_model.m.alpha": torch.tensor(float(bad))})
    with pytest.raises(CheckpointError, match="positive number"):
        LoraSet.load(p)


def test_cli_refuses_a_bad_alpha_before_any_work(tmp_path):
    from click.testing import CliRunner

    from lowvram.quantize.cli import quantize_cmd

    p = tmp_path / "a.safetensors"
    _pair_file(p, {"blocks.0.self_attn.q": (6, 5)})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"dim": 8, "ffn_dim": 8, "freq_dim": 8, "num_heads": 2, '
                                                   '"num_layers": 1, "audio_inject_layers": [0]}')
    res = CliRunner().invoke(quantize_cmd, ["--ckpt-dir", str(tmp_path / "ckpt"), "--lora", str(p), "--scheme",
                                            "int8", "--out", str(tmp_path / "out"), "--lora-alpha", "nan"])
    assert res.exit_code == 2 and "--lora-alpha must be a positive number (got nan)" in res.output
    assert not (tmp_path / "out").exists()
