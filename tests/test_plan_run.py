"""`lowvram plan` prints the plan that `lowvram run` executes: both go through plan_run with the same
profile (or the resident preset), overrides, checkpoint, size rule and machine measurement."""

import json

import pytest
import torch
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.errors import LowvramError
from lowvram.runtime.plan import plan_run, resolve_size


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    from lowvram.quantize.convert import convert

    ckpt, lora = tiny_ckpt
    out = tmp_path_factory.mktemp("q") / "int8"
    convert(ckpt, out, "int8", lora=lora, progress=False)
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    synth_portrait(str(d / "wide.png"), width=240, height=160, seed=2)  # 3:2, so the area rule shows
    synth_voice(str(d / "voice.wav"), seconds=1.2, seed=2)
    return d


CASES = [  # (checkpoint, profile, --set, --size)
    ("bf16", None, (), "128*128"),
    ("bf16", None, ("kv_placement=host", "kv_dtype=int8", "blocks_resident=1", "vram_budget_gib=40"), "192*128"),
    ("int8", "4090", ("blocks_resident=2",), "128*128"),
    ("int8", "12gb", ("prefetch_blocks=2",), "192*128"),
    ("int8", "16gb", ("attention=sdpa", "t5=bf16"), "256*192"),
]


@pytest.mark.parametrize("which,profile,sets,size", CASES)
def test_the_printed_plan_is_the_executed_plan(tiny_ckpt, quantized, media, tmp_path, which, profile, sets, size):
    ckpt, lora = tiny_ckpt
    ckpt_dir = ckpt if which == "bf16" else quantized
    common = ["--ckpt-dir", str(ckpt_dir), "--size", size, "--device", "cpu", "--image", str(media / "wide.png")]
    common += ["--profile", profile] if profile else []
    for s in sets:
        common += ["--set", s]
    shown = CliRunner().invoke(cli, ["plan", "--json", *common])
    assert shown.exit_code == 0, shown.output
    report = tmp_path / "r.json"
    ran = CliRunner().invoke(cli, ["run", *common, "--lora", str(lora), "--audio", str(media / "voice.wav"),
                                   "--prompt", "p", "--num-clip", "1", "--quiet", "--out", str(tmp_path / "o.mp4"),
                                   "--report", str(report)])
    assert ran.exit_code == 0, ran.output
    executed = json.loads(report.read_text())["plan"]
    assert json.loads(shown.output) == executed
    # and the run's video has the planned size (the area budget kept the portrait's 3:2)
    assert (executed["width"], executed["height"]) == resolve_size(size, media / "wide.png")


def test_no_profile_is_the_resident_preset_and_takes_overrides(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    plan = plan_run(ckpt, None, ("attention=triton", "gemm=reference"), "128*128", device=torch.device("cpu"))
    assert plan.profile.name == "resident" and plan.streamed == () and plan.kv_caches == ("gpu",) * 4
    assert (plan.attention, plan.gemm, plan.quant) == ("triton", "reference", "bf16")


def test_a_scheme_mismatch_is_one_policy_for_both_commands(tiny_ckpt, quantized):
    ckpt, _ = tiny_ckpt
    with pytest.raises(LowvramError, match="lowvram quantize"):
        plan_run(ckpt, "4090", (), "128*128", device=torch.device("cpu"))
    with pytest.raises(LowvramError, match="quantized as int8 but profile h100-80 uses fp8; use --set quant=int8"):
        plan_run(quantized, "h100-80", (), "128*128", device=torch.device("cpu"))
    assert plan_run(quantized, "h100-80", ("quant=int8",), "128*128", device=torch.device("cpu")).quant == "int8"


def test_the_planner_reads_sizes_from_the_files(tiny_ckpt):
    """The tiny checkpoint's umT5, VAE and DiT come from its files, not the 14B formulas (a 10.6 GiB T5 before)."""
    from lowvram.constants import GIB

    ckpt, _ = tiny_ckpt
    plan = plan_run(ckpt, None, (), "128*128", device=torch.device("cpu"))
    t5 = next(it for it in plan.items if it.what.startswith("umT5"))
    assert plan.exact_bytes and t5.nbytes < 0.01 * GIB and plan.generate_peak_bytes < 1.5 * GIB
    weights = sum(it.nbytes for it in plan.items if it.what.startswith(("DiT blocks", "DiT non-block")))
    model_bytes = sum(t.numel() * 4 for t in _tiny_model_tensors(ckpt))  # fp32 on the CPU
    assert model_bytes <= weights < model_bytes + 40 * 256 * 64


def _tiny_model_tensors(ckpt):
    from lowvram.io.weights import discover, load_dit

    return list(load_dit(discover(ckpt), dtype=torch.float32).state_dict().values())


def test_triton8_caches_are_planned_in_8_bits(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    bf = plan_run(ckpt, None, (), "256*256", device=torch.device("cpu"))
    k8 = plan_run(ckpt, None, ("attention=triton8",), "256*256", device=torch.device("cpu"))
    kv = {p.kv_format: next(it.nbytes for it in p.items if it.what.startswith("KV ring")) for p in (bf, k8)}
    cfg = (2, 32)  # tiny: 2 heads x 32
    assert kv["kv8"] * 2 * cfg[1] == kv["bf16"] * (cfg[1] + 4)  # (D + 4 scale bytes) per head vs 2 D
    host = plan_run(ckpt, None, ("attention=triton8", "kv_placement=host"), "256*256", device=torch.device("cpu"))
    assert host.kv_format == "kv8" and host.kv_caches == ("host",) * 4 and host.kv_slots == 2
