import dataclasses

import pytest
import torch

from lowvram.errors import LowvramError
from lowvram.runtime import profile as profile_mod
from lowvram.runtime.profile import Profile, parse_set, pick_profile_name

NAMES = ["12gb", "16gb", "3090", "4090", "a100-80", "h100-80"]


def test_every_shipped_profile_loads_typed():
    assert Profile.names() == NAMES
    for name in NAMES:
        p = Profile.from_name(name)
        assert p.name == name and isinstance(p.vram_budget_gib, float) and isinstance(p.prefetch_blocks, int)
        assert "\n" not in p.summary() and name in p.summary()
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.quant = "bf16"


def test_profile_contents_match_the_cards():
    p = {n: Profile.from_name(n) for n in NAMES}
    assert (p["4090"].quant, p["4090"].kv_placement, p["4090"].kv_dtype) == ("int8", "host", "int8")
    assert p["4090"].vram_budget_gib <= 22.0
    assert p["3090"].quant == "int8"  # no FP8 on sm_86
    for n in ("16gb", "12gb"):
        assert (p[n].quant, p[n].kv_placement) == ("int8", "host") and p[n].t5 != "bf16"
    assert (p["a100-80"].quant, p["a100-80"].kv_placement) == ("int8", "gpu")
    assert (p["h100-80"].quant, p["h100-80"].kv_placement, p["h100-80"].kv_dtype) == ("fp8", "gpu", "bf16")
    # the consumer cards' profiles pick the attention by the GPU; each profile names its card's capability
    assert {n: p[n].attention for n in NAMES} == {**{n: "auto" for n in ("12gb", "16gb", "3090", "4090")},
                                                  "a100-80": "sdpa", "h100-80": "sdpa"}
    caps = {n: p[n].card_capability() for n in NAMES}
    assert caps == {"12gb": (8, 9), "16gb": (8, 9), "3090": (8, 6), "4090": (8, 9), "a100-80": (8, 0), "h100-80": (9, 0)}
    assert Profile.resident("bf16", 80.0).card_capability() is None


def test_overrides_and_parse_set():
    over = parse_set(["vram_budget_gib=20.5", "blocks_resident=12", "kv_dtype=bf16", "prefetch_blocks = 2",
                      "attention=sdpa"])
    assert over == {"vram_budget_gib": 20.5, "blocks_resident": 12, "kv_dtype": "bf16", "prefetch_blocks": 2,
                    "attention": "sdpa"}
    p = Profile.from_name("4090", **over)
    assert p.blocks_resident == 12 and p.kv_dtype == "bf16"
    assert parse_set(["blocks_resident=auto"]) == {"blocks_resident": "auto"}
    assert parse_set(["attention=auto", "compute_capability=9.0"]) == {"attention": "auto", "compute_capability": "9.0"}
    assert Profile.from_name("h100-80", attention="auto").attention == "auto"
    assert p.with_overrides(t5="cpu").t5 == "cpu"


@pytest.mark.parametrize("items, match", [
    (["foo=1"], "unknown key"),
    (["name=x"], "unknown key"),
    (["vram_budget_gib=lots"], "expected a number"),
    (["prefetch_blocks=1.5"], "expected an integer"),
    (["blocks_resident=some"], "'auto' or an integer"),
    (["kv_dtype=fp4"], "one of bf16, int8"),
    (["vram_budget_gib"], "expected key=value"),
])
def test_parse_set_errors_are_one_line(items, match):
    with pytest.raises(LowvramError, match=match) as e:
        parse_set(items)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over, match", [
    ({"vram_budget_gib": -1.0}, "vram_budget_gib"),
    ({"blocks_resident": -3}, "blocks_resident"),
    ({"prefetch_blocks": 9}, "prefetch_blocks"),
    ({"kv_layers_ahead": 0}, "kv_layers_ahead=0 must be an integer in 1..8"),
    ({"kv_layers_ahead": True}, "kv_layers_ahead"),
    ({"quant": "int4"}, "quant"),
    ({"kv_placement": "gpu"}, "needs kv_placement=host"),  # 4090 keeps int8 KV
    ({"description": "two\nlines"}, "one non-empty line"),
    ({"compute_capability": "sm_89"}, "MAJOR.MINOR"),
    ({"compute_capability": 8.9}, "MAJOR.MINOR"),
    ({"attention": "fast"}, "attention='fast' is not one of sdpa, triton, triton8, sage, fa4, auto"),
    ({"colour": "red"}, "unknown key"),
])
def test_validation_says_how_to_fix(over, match):
    with pytest.raises(LowvramError, match=match) as e:
        Profile.from_name("4090", **over)
    assert "--set" in str(e.value) or "unknown key" in str(e.value) or "line" in str(e.value)


def test_unknown_profile_and_bad_files(tmp_path, monkeypatch):
    with pytest.raises(LowvramError, match="unknown profile 'rtx9090'.*4090"):
        Profile.from_name("rtx9090")
    (tmp_path / "mine.toml").write_text('description = "x"\nvram_budget_gib = 10.0\nturbo = true\n')
    (tmp_path / "short.toml").write_text('description = "x"\n')
    (tmp_path / "broken.toml").write_text('description = "x\n')
    monkeypatch.setattr(profile_mod.resources, "files", lambda pkg: tmp_path)
    with pytest.raises(LowvramError, match="mine.toml: unknown key.*turbo"):
        Profile.from_name("mine")
    with pytest.raises(LowvramError, match="short.toml lacks vram_budget_gib"):
        Profile.from_name("short")
    with pytest.raises(LowvramError, match="not valid TOML"):
        Profile.from_name("broken")


@pytest.mark.parametrize("gpu, gib, cc, want", [
    ("NVIDIA GeForce RTX 4090", 23.6, (8, 9), "4090"),
    ("NVIDIA GeForce RTX 3090", 23.7, (8, 6), "3090"),
    ("NVIDIA GeForce RTX 4080", 15.6, (8, 9), "16gb"),
    ("NVIDIA GeForce RTX 3060", 11.7, (8, 6), "12gb"),
    ("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), "a100-80"),
    ("NVIDIA H100 80GB HBM3", 79.1, (9, 0), "h100-80"),
    ("NVIDIA H200", 139.8, (9, 0), "h100-80"),
])
def test_auto_picks_by_memory_and_capability(gpu, gib, cc, want):
    assert pick_profile_name(gpu, gib, cc, 64.0) == want


def test_auto_errors_without_a_usable_gpu(monkeypatch):
    with pytest.raises(LowvramError, match="at least 12 GB"):
        pick_profile_name("GTX 1080", 7.9, (6, 1), 32.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LowvramError, match="no CUDA GPU"):
        Profile.from_name("auto")
