import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowvram.cli.plan import plan_cmd, profiles_cmd, render_plan
from lowvram.errors import LowvramError
from lowvram.model.config import DiTConfig
from lowvram.runtime.plan import plan_run
from lowvram.runtime.planner import forward_activation_bytes, make_plan, token_counts, workspace_sink_tokens
from lowvram.runtime.profile import GIB, Profile

INJECT = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
FULL = DiTConfig(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40, text_dim=4096,
                 audio_inject_layers=INJECT)
NAMES = ["12gb", "16gb", "3090", "4090", "a100-80", "h100-80"]
SIZES = [(704, 384), (832, 480)]
ALIGN_SLACK = 256  # the planner pads each tensor of a slab to 256 bytes


# ---- bytes computed independently from the parameter counts of docs/model.md §1.1, §2.2
def ref_block(quant):
    """(bytes, tensor count) of one block: Linear weights at the scheme's width + fp32 per-channel scales."""
    d, f, params = 5120, 13824, 351_394_304
    lin = 8 * d * d + 2 * d * f
    outs = 9 * d + f
    if quant == "bf16":
        return 2 * params, 27
    return lin + 4 * outs + 2 * (params - lin), 37


def ref_injector(quant):
    d, params = 5120, (1_258_659_840 + 629_268_480) // 12
    lin, outs = 6 * d * d, 6 * d
    if quant == "bf16":
        return 2 * params, 12
    return lin + 4 * outs + 2 * (params - lin), 17


def ref_kv_token(kv_dtype):
    return 2 * (5120 + 40 * 4) if kv_dtype == "int8" else 2 * 5120 * 2


def ref_tokens(w, h):
    rows, cols, lh, lw = h // 16, w // 16, h // 8, w // 8
    return rows * cols, 3 * rows * cols, 12 * rows * cols, 2 * rows * cols + (lh // 4) * (lw // 4) + 4 * (lh // 8) * (lw // 8)


def test_token_counts_match_the_brief():
    assert ref_tokens(704, 384) == (1056, 3168, 12672, 2640)
    for w, h in SIZES + [(720, 400 - 400 % 16)]:
        t = token_counts(FULL, w, h)
        assert (t["per_frame"], t["query"], t["capacity"], t["sink"]) == ref_tokens(w, h)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_plan_decisions_against_independent_bytes(name, size):
    prof = Profile.from_name(name, schedule="sequential")  # one forward per call: the byte model below
    if (name, size) == ("12gb", (832, 480)):
        # with the measured W8A8 transients and sdpa's workspace (bf16 windows), 480p needs more than a 12 GB card:
        # the error says what fits; the card's own attention ("auto": triton8, kv8 windows) fits
        with pytest.raises(LowvramError, match="smallest budget that fits is"):
            make_plan(prof.with_overrides(attention="sdpa"), FULL, *size)
    plan = make_plan(prof, FULL, *size)
    assert sorted(plan.resident + plan.streamed) == list(range(40)) and not set(plan.resident) & set(plan.streamed)
    for i, got in enumerate(plan.block_bytes):
        want, n = ref_block(prof.quant)
        if i in INJECT:
            want, n = want + ref_injector(prof.quant)[0], n + ref_injector(prof.quant)[1]
        assert want <= got < want + n * ALIGN_SLACK
    assert plan.peak_bytes <= prof.vram_budget_gib * GIB
    assert plan.generate_peak_bytes == sum(it.nbytes for it in plan.items if it.where == "gpu")
    # residency is maximal: one more resident block would break the budget (with the decode overlap decided;
    # "auto" would otherwise buy the block back by decoding serially)
    if plan.streamed:
        with pytest.raises(LowvramError, match="over the"):
            make_plan(prof.with_overrides(blocks_resident=len(plan.resident) + 1,
                                          vae_overlap="on" if plan.vae_overlap else "off"), FULL, *size)
        assert plan.n_buffers == min(prof.prefetch_blocks + 1, len(plan.streamed))
    # PCIe and host bytes per forward
    _, q, cap, _ = ref_tokens(*size)
    streamed = sum(plan.block_bytes[i] for i in plan.streamed)
    host = prof.kv_placement == "host"
    kv = ref_kv_token(prof.kv_dtype)
    assert plan.pcie_h2d_bytes == streamed + (40 * (cap - q) * kv if host else 0)
    assert plan.pcie_d2h_bytes == (40 * q * kv if host else 0)
    assert plan.host_pinned_bytes + plan.host_pageable_bytes == streamed + (4 * 40 * cap * kv if host else 0)
    assert plan.kv_caches == (prof.kv_placement,) * 4
    assert plan.host_pinned_bytes == plan.pinned_kv_caches * 40 * cap * kv + sum(plan.block_bytes[i] for i in plan.pinned_blocks)
    assert name in render_plan(plan) and "expected peak" in render_plan(plan) and plan.headline()


def test_targets_at_704x384():
    p4090 = make_plan(Profile.from_name("4090"), FULL, 704, 384)
    assert p4090.peak_bytes <= 22.0 * GIB and len(p4090.resident) >= 24
    p4090 = make_plan(Profile.from_name("4090", vram_budget_gib=30.0), FULL, 704, 384)
    assert len(p4090.resident) == 40
    # all-resident INT8 DiT = 15,938,355,200 Linear weights + 0.357 B bf16 params (docs/model.md §1.5: 16.65 GB)
    # + fp32 per-output-channel scales
    weights = sum(it.nbytes for it in p4090.items if it.what.startswith(("DiT blocks", "DiT non-block")))
    want = 15_938_355_200 + 2 * 357_400_409 + 4 * (40 * (9 * 5120 + 13824) + 12 * 6 * 5120)
    assert want <= weights < want + (40 * 37 + 12 * 17) * ALIGN_SLACK
    p12 = make_plan(Profile.from_name("12gb"), FULL, 704, 384)
    assert p12.peak_bytes <= 11.5 * GIB and p12.streamed and p12.n_buffers == 2
    for name in ("a100-80", "h100-80"):
        p = make_plan(Profile.from_name(name), FULL, 704, 384)
        assert len(p.resident) == 40 and p.kv_caches == ("gpu",) * 4 and p.pcie_h2d_bytes == 0
    p16 = make_plan(Profile.from_name("16gb"), FULL, 704, 384)
    assert len(p12.resident) < len(p16.resident) < 40
    # a model that keeps the sink in bf16 (2640 x 40 layers x K,V) costs the 4090 some resident blocks
    bf16_sink = make_plan(Profile.from_name("4090"), FULL, 704, 384, sink_dtype="bf16")
    assert [it.nbytes for it in bf16_sink.items if it.what.startswith("sink")] == [40 * 2640 * ref_kv_token("bf16")]
    assert len(bf16_sink.streamed) > len(make_plan(Profile.from_name("4090"), FULL, 704, 384).streamed)
    assert bf16_sink.peak_bytes <= 22.0 * GIB
    # the plan says how the sink is kept (the pipeline passes it to the Generator): the profile's kv_dtype
    assert (p4090.sink_dtype, bf16_sink.sink_dtype, p12.sink_dtype) == ("int8", "bf16", "int8")
    assert make_plan(Profile.from_name("h100-80"), FULL, 704, 384).sink_dtype == "bf16"


def test_gpu_caches_get_sink_room_where_it_costs_no_resident_block():
    """bf16 GPU step caches under sdpa hold the sink behind every layer's window (GpuKVCache.joined) when the plan
    keeps the same blocks resident with that room: h100-80 at 704x384 keeps 40/40 with 4 x 40 x 2640 tokens of
    room (2.0 GiB a cache), counted in the peak. A budget that fits the caches but not the room, or a fixed
    residency that the room would break, plans no room (sdpa then concatenates); so do the Triton kernels, kv8
    and host caches (whose workspace has its own room). make_kv_caches allocates what the plan counts."""
    from types import SimpleNamespace

    from lowvram.runtime.engine import make_kv_caches

    room_bytes = 4 * 40 * 2640 * ref_kv_token("bf16")
    for schedule in ("batched", "sequential"):
        prof = Profile.from_name("h100-80", schedule=schedule)
        plan = make_plan(prof, FULL, 704, 384)
        room = [it.nbytes for it in plan.items if it.what.startswith("sink room")]
        assert plan.gpu_kv_sink == 2640 and room == [room_bytes] == [8_650_752_000]
        assert len(plan.resident) == 40 and plan.batch == (4 if schedule == "batched" else 1)
        assert plan.generate_peak_bytes == sum(it.nbytes for it in plan.items if it.where == "gpu")
        assert plan.peak_bytes <= prof.vram_budget_gib * GIB
        # the budget between the plans without and with the room: no room, and nothing streams for it
        without = (plan.generate_peak_bytes - room_bytes * (1 + 0.05)) / GIB
        tight = make_plan(prof.with_overrides(vram_budget_gib=round(without + 1.0, 1)), FULL, 704, 384)
        assert tight.gpu_kv_sink == 0 and len(tight.resident) == 40 and tight.batch == plan.batch
        assert not any(it.what.startswith("sink room") for it in tight.items)
        assert plan.generate_peak_bytes - tight.generate_peak_bytes > room_bytes  # + its allocator slack
        fixed = make_plan(prof.with_overrides(vram_budget_gib=round(without + 1.0, 1), blocks_resident=40), FULL,
                          704, 384)
        assert fixed.gpu_kv_sink == 0 and len(fixed.resident) == 40
    for over in (dict(attention="triton"), dict(attention="triton8"), dict(kv_placement="host")):
        assert make_plan(Profile.from_name("h100-80", **over), FULL, 704, 384).gpu_kv_sink == 0, over
    # the engine's caches hold the bytes the plan counts (a tiny model: the ring and the room, K and V, bf16)
    cfg = DiTConfig(dim=64, ffn_dim=96, freq_dim=32, num_heads=4, num_layers=3, audio_inject_layers=(0, 2))
    tiny = make_plan(Profile.resident("bf16", 1024.0), cfg, 128, 128)
    caches = make_kv_caches(SimpleNamespace(cfg=cfg, dtype=torch.bfloat16), tiny, "cpu", tiny.tokens["per_frame"])
    assert tiny.gpu_kv_sink == tiny.tokens["sink"] and all(c.sink == tiny.gpu_kv_sink for c in caches)
    planned = sum(it.nbytes for it in tiny.items if it.what.startswith(("KV ring", "sink room")))
    assert sum(c.nbytes() for c in caches) == planned


def _quantized_names(cfg, scheme_bytes=1):
    """A fake quantized checkpoint's tensor sizes, named like lowvram's format (X.qweight, X.scale, X.bias)."""
    out = {}
    for i in range(cfg.num_layers):
        for m in ("self_attn.q", "cross_attn.o", "ffn.0"):
            out[f"blocks.{i}.{m}.qweight"] = 1000 * scheme_bytes + i
            out[f"blocks.{i}.{m}.scale"] = 40
        out[f"blocks.{i}.modulation"] = 300
    for k in range(len(cfg.audio_inject_layers)):
        out[f"audio_injector.injector.{k}.q.qweight"] = 777
        out[f"audio_injector.injector_adain_layers.{k}.linear.qweight"] = 555
    out["text_embedding.0.weight"] = 12345
    return out


def test_exact_bytes_from_headers():
    names = _quantized_names(FULL)
    plan = make_plan(Profile.from_name("4090"), FULL, 704, 384, tensor_bytes=names)
    assert plan.exact_bytes and "estimated" not in render_plan(plan)
    assert plan.block_bytes[1] == 3 * (1024 + 256) + 512  # 1001 -> 1024 aligned, scale 40 -> 256, modulation 300 -> 512
    assert plan.block_bytes[0] == plan.block_bytes[1] + 1024 + 768  # + injector 0 (777) and its adain (555)
    assert plan.items[1].nbytes == 12345  # everything else


def test_machine_errors_say_what_fits():
    p4090 = Profile.from_name("4090")
    with pytest.raises(LowvramError, match="only 12.0 GiB free; use --set vram_budget_gib=12.0"):
        make_plan(p4090, FULL, 704, 384, free_vram_bytes=12 * GIB)
    with pytest.raises(LowvramError, match=r"host has 16.0 GiB RAM; it needs \d+ GiB"):
        make_plan(p4090, FULL, 704, 384, host_ram_bytes=16 * GIB)
    ok = make_plan(p4090, FULL, 704, 384, free_vram_bytes=23 * GIB, host_ram_bytes=32 * GIB)
    assert ok.host_pageable_bytes == 0
    tight = make_plan(p4090.with_overrides(pinned_budget_gib=10.0), FULL, 704, 384)
    assert tight.host_pinned_bytes == 2 * 40 * 12672 * ref_kv_token("int8")  # two of four caches pinned
    assert tight.pinned_kv_caches == 2 and tight.pinned_blocks == ()
    assert "pageable" in render_plan(tight)
    # the pinned buffers are registered at their exact size (offload._registered): the plan's figure is what is taken
    kv = 40 * 12672 * ref_kv_token("int8")
    slabs = [ok.block_bytes[i] for i in ok.pinned_blocks]
    assert ok.pinned_kv_caches == 4 and ok.host_pinned_bytes == 4 * kv + sum(slabs)
    assert f"host memory: {ok.host_pinned_bytes / GIB:.1f} GiB pinned" in render_plan(ok)
    resident = make_plan(Profile.from_name("h100-80"), FULL, 704, 384)
    assert resident.host_pinned_bytes == 0 and "host memory: 0.0 GiB pinned" in render_plan(resident)


def test_budget_errors_say_what_fits():
    small = Profile.from_name("12gb", vram_budget_gib=4.0, t5="cpu")
    with pytest.raises(LowvramError, match="smallest budget that fits is") as e:
        make_plan(small, FULL, 704, 384)
    need = float(str(e.value).split("fits is ")[1].split(" GiB")[0])
    fits = make_plan(small.with_overrides(vram_budget_gib=need), FULL, 704, 384)
    assert fits.resident == () and fits.peak_bytes <= need * GIB
    for schedule in ("sequential", "batched"):  # the count it names fits (batched falls back to one per call)
        with pytest.raises(LowvramError, match=r"blocks_resident=(\d+) or auto") as e:
            make_plan(Profile.from_name("12gb", blocks_resident=40, schedule=schedule), FULL, 704, 384)
        n = int(re.search(r"blocks_resident=(\d+)", str(e.value)).group(1))
        auto = make_plan(Profile.from_name("12gb", schedule="sequential"), FULL, 704, 384)
        assert n == len(auto.resident)
        assert len(make_plan(Profile.from_name("12gb", blocks_resident=n, schedule=schedule), FULL, 704, 384).resident) == n
    with pytest.raises(LowvramError, match="has 40 blocks"):
        make_plan(Profile.from_name("4090", blocks_resident=41), FULL, 704, 384)
    with pytest.raises(LowvramError, match="use --set t5=int8, t5=nf4 or t5=cpu"):
        make_plan(Profile.from_name("12gb", t5="bf16"), FULL, 704, 384)
    with pytest.raises(LowvramError, match="use --set t5=nf4 or t5=cpu"):
        make_plan(Profile.from_name("12gb", t5="int8", vram_budget_gib=6.0), FULL, 704, 384)
    with pytest.raises(LowvramError, match="multiples of 16"):
        make_plan(Profile.from_name("4090"), FULL, 700, 384)


def test_triton8_with_host_caches_plans_kv8_windows_and_the_int8_bytes():
    """attention=triton8 on a host-cache profile: the step caches stay in host memory in the 8-bit kernel's format,
    with int8's bytes over PCIe and in host memory; on the device a ring of kv8 windows (half the bf16 ones, and
    no quantization temporaries) and the caches' K means; the sink stays int8 as the profile's kv_dtype says."""
    for schedule, slots in (("sequential", 2), ("batched", 5)):
        int8 = make_plan(Profile.from_name("4090", attention="sdpa", schedule=schedule), FULL, 704, 384)
        kv8 = make_plan(Profile.from_name("4090", attention="triton8", schedule=schedule), FULL, 704, 384)
        assert (int8.kv_format, kv8.kv_format, kv8.attention) == ("int8", "kv8", "triton8")
        assert kv8.kv_caches == ("host",) * 4 and kv8.kv_slots == slots and kv8.sink_dtype == "int8"
        for p in (int8, kv8):
            streamed = sum(p.block_bytes[i] for i in p.streamed)
            assert p.pcie_h2d_bytes == streamed // p.batch + 40 * (12672 - 3168) * ref_kv_token("int8")
            assert p.pcie_d2h_bytes == 40 * 3168 * ref_kv_token("int8")
        host = {p.kv_format: next(it.nbytes for it in p.items if it.what.startswith("KV ring")) for p in (int8, kv8)}
        assert host["kv8"] == host["int8"] == 4 * 40 * 12672 * ref_kv_token("int8")
        ws = {p.kv_format: next(it.nbytes for it in p.items if it.what.startswith("KV working")) for p in (int8, kv8)}
        window8 = 12672 * ref_kv_token("int8")  # K, V int8 + their fp32 scales, in the kernel's layout
        assert ws["kv8"] == slots * window8 + (12672 + 3168) * (5120 + 2 * 40 * 4)  # + V and scales staged
        assert ws["kv8"] < 0.5 * ws["int8"]
        means = [it.nbytes for it in kv8.items if it.what.startswith("kv8 K smoothing")]
        assert means == [4 * 40 * 40 * 128 * 4] and not any(it.what.startswith("kv8") for it in int8.items)
        assert len(kv8.resident) >= len(int8.resident) and kv8.peak_bytes <= 22.0 * GIB
    gpu = make_plan(Profile.from_name("4090", attention="triton8", kv_placement="gpu", kv_dtype="bf16",
                                      vram_budget_gib=76.0), FULL, 704, 384)
    assert gpu.kv_format == "kv8" and gpu.pcie_h2d_bytes == 0 and gpu.sink_dtype == "bf16"
    assert [it.nbytes for it in gpu.items if it.what.startswith("kv8 K smoothing")] == [4 * 40 * 40 * 128 * 4]


# ---- the CLI
@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FULL.to_dict()))
    return tmp_path


def _run(*args):
    return CliRunner().invoke(plan_cmd, [str(a) for a in args])


@pytest.mark.parametrize("cap, want", [((8, 9), "triton8"), ((8, 6), "triton8"), ((9, 0), "sdpa"), ((8, 0), "sdpa"),
                                       ((12, 0), "sdpa")])
def test_auto_attention_resolves_by_the_measured_gpu(ckpt, cap, want):
    """attention = "auto" (the 24/16/12 GB profiles): the 8-bit kernel with kv8 host caches on sm_86/sm_89, where
    INT8 tensor cores run >= 4x bf16; sdpa with int8 host caches on Hopper and elsewhere; the plan says why."""
    from lowvram.runtime.machine import Machine

    for name in ("4090", "3090", "16gb", "12gb"):
        machine = Machine("cuda", capability=cap)  # what Machine.detect reads off a GPU; nothing else checked
        plan = plan_run(ckpt, name, (), "704*384", machine=machine, device=torch.device("cuda"), dtype=torch.bfloat16)
        assert (plan.attention, plan.kv_format) == (want, "kv8" if want == "triton8" else "int8"), name
        assert plan.attention_why.startswith(f"auto on sm_{cap[0]}{cap[1]} (this GPU)")
        assert plan.to_dict()["profile"]["attention"] == "auto" and plan.to_dict()["attention"] == want
    assert "Hopper" in plan_run(ckpt, "4090", (), "704*384", machine=Machine("cuda", capability=(9, 0)),
                                device=torch.device("cuda")).attention_why
    # an explicit choice is never second-guessed
    sm90 = plan_run(ckpt, "4090", ("attention=triton8",), "704*384", machine=Machine("cuda", capability=(9, 0)),
                    device=torch.device("cuda"))
    assert (sm90.attention, sm90.kv_format, sm90.attention_why) == ("triton8", "kv8", "set by the profile or an override")


def test_sageattention_is_a_choice_auto_never_takes(ckpt, monkeypatch):
    """attention=sage (SageAttention 2, kernels/sage.py; importable is stood in for here) plans as sdpa does: int8 host
    caches dequantized into bf16 slots with the sink behind the window, plus its own per-call copies in the
    activations. "auto" does not take it even where it imports: slower end to end on the H100 (BENCHMARKS.md §3)."""
    from lowvram.kernels import sage
    from lowvram.runtime.machine import Machine

    monkeypatch.setattr(sage, "unavailable", lambda device="cuda": None)
    for cap, want in (((9, 0), "sdpa"), ((8, 9), "triton8"), ((8, 0), "sdpa")):
        plan = plan_run(ckpt, "4090", (), "704*384", machine=Machine("cuda", capability=cap),
                        device=torch.device("cuda"), dtype=torch.bfloat16)
        assert plan.attention == want, cap
    plan = plan_run(ckpt, "4090", ("attention=sage",), "704*384", machine=Machine("cuda", capability=(9, 0)),
                    device=torch.device("cuda"), dtype=torch.bfloat16)
    assert (plan.attention, plan.kv_format, plan.attention_why) == ("sage", "int8", "set by the profile or an override")
    assert workspace_sink_tokens(plan) == 2640  # the sink behind each bf16 window slot, as for sdpa
    lk = 12672 + 2640
    assert forward_activation_bytes(FULL, 3168, lk, 2640, "sage") > forward_activation_bytes(FULL, 3168, lk, 2640, "sdpa")


def test_fa4_plans_as_sdpa_where_it_imports(ckpt, monkeypatch):
    """attention=fa4 (FlashAttention 4, kernels/flash4.py; importable is stood in for here): sdpa's plan exactly
    (its exact bf16 kernel reads the same joined window and sink, with no copies of its own), GPU caches with the
    sink room on h100-80 too; refused in one line where it does not import."""
    from lowvram.kernels import flash4
    from lowvram.runtime.machine import Machine

    monkeypatch.setattr(flash4, "unavailable", lambda device="cuda": None)
    for name in ("4090", "h100-80"):
        got = {a: plan_run(ckpt, name, (f"attention={a}",), "704*384", machine=Machine("cuda", capability=(9, 0)),
                           device=torch.device("cuda"), dtype=torch.bfloat16) for a in ("sdpa", "fa4")}
        assert got["fa4"].attention == "fa4"
        same = [p.to_dict() for p in got.values()]
        for d in same:  # everything but the name of the backend
            d["attention"] = d["profile"]["attention"] = None
        assert same[0] == same[1], name
    assert workspace_sink_tokens(got["fa4"]) == 2640
    monkeypatch.setattr(flash4, "unavailable", lambda device="cuda": "flash-attn-4 is not importable")
    with pytest.raises(LowvramError, match="--attention fa4 cannot run on cuda: flash-attn-4 is not importable"):
        plan_run(ckpt, "4090", ("attention=fa4",), "704*384", machine=Machine("cuda", capability=(9, 0)),
                 device=torch.device("cuda"))


def test_auto_attention_without_a_measured_gpu():
    """No GPU measured (`lowvram plan` on another machine, make_plan alone): the card the profile names; the CPU
    device (the tiny checkpoint's runs): sdpa; a profile that names no card (the resident preset): sdpa."""
    from lowvram.model.attention import CHOICES, attend_two_segments, check_backend
    from lowvram.runtime.planner import resolve_attention

    got = {n: resolve_attention(Profile.from_name(n, attention="auto"))[0] for n in NAMES}
    assert got == {"12gb": "triton8", "16gb": "triton8", "3090": "triton8", "4090": "triton8", "a100-80": "sdpa",
                   "h100-80": "sdpa"}
    assert resolve_attention(Profile.from_name("4090"))[1] == ("auto on sm_89 (profile 4090's card, no GPU "
                                                               "measured): INT8 tensor cores run >= 4x bf16 there")
    assert resolve_attention(Profile.from_name("4090"), (8, 9), "cpu") == ("sdpa", "auto on the CPU: no INT8 tensor "
                                                                           "cores to gain from")
    assert resolve_attention(Profile.from_name("4090", compute_capability="9.0"))[0] == "sdpa"
    assert resolve_attention(Profile.resident("int8", 24.0, attention="auto"))[0] == "sdpa"
    p = make_plan(Profile.from_name("4090"), FULL, 704, 384)
    assert (p.attention, p.kv_format, p.kv_caches) == ("triton8", "kv8", ("host",) * 4)
    # "auto" is a profile's word: the model runs resolved backends only
    check_backend("auto", CHOICES)
    with pytest.raises(LowvramError, match="resolved by the planner"):
        check_backend("auto")
    with pytest.raises(LowvramError, match="resolved by the planner"):
        attend_two_segments(*[torch.zeros(1, 2, 1, 8)] * 3, None, None, None, None, backend="auto")


def test_plan_cli_prints_the_plan(ckpt):
    r = _run("--profile", "4090", "--ckpt-dir", ckpt, "--size", "704*384")
    assert r.exit_code == 0, r.output
    assert "blocks resident: " in r.output and "PCIe per forward" in r.output and "estimated" in r.output
    # no GPU here: planned for the profile's card (sm_89), whose attention "auto" is the 8-bit kernel
    assert "KV host kv8" in r.output and "attention triton8: auto on sm_89 (profile 4090's card" in r.output
    r = _run("--profile", "4090", "--ckpt-dir", ckpt, "--size", "704*384", "--set", "compute_capability=9.0")
    assert r.exit_code == 0 and "attention sdpa: auto on sm_90" in r.output and "KV host int8" in r.output
    r = _run("--profile", "12gb", "--ckpt-dir", ckpt, "--size", "832*480", "--set", "prefetch_blocks=2",
             "--set", "vram_budget_gib=13.0")
    assert r.exit_code == 0 and "(3 GPU buffers)" in r.output


@pytest.mark.parametrize("args, match", [
    (["--profile", "rtx9090"], "unknown profile"),
    (["--profile", "4090", "--vram-gib", "16"], "only 16.0 GiB free"),
    (["--profile", "4090", "--set", "turbo=1"], "unknown key"),
    (["--profile", "4090", "--set", "vram_budget_gib=big"], "expected a number"),
    (["--profile", "4090", "--host-ram-gib", "16"], "16.0 GiB RAM"),
    (["--profile", "4090", "--size", "704x"], "WIDTH\\*HEIGHT"),
    (["--profile", "4090", "--attention", "sage", "--device", "cpu"], "--attention sage cannot run on cpu: needs a CUDA"),
])
def test_plan_cli_errors_exit_2_one_line(ckpt, args, match):
    r = _run(*args, "--ckpt-dir", ckpt)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    import re
    assert re.search(match, lines[0])


def test_plan_cli_reads_a_quantized_checkpoint(tmp_path):
    cfg = DiTConfig(dim=64, ffn_dim=96, freq_dim=32, num_heads=4, num_layers=4, audio_inject_layers=(0, 2))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(4):
        tensors[f"blocks.{i}.ffn.0.qweight"] = torch.randint(-127, 127, (96, 64), generator=g, dtype=torch.int8)
        tensors[f"blocks.{i}.ffn.0.scale"] = torch.rand(96, generator=g)
    tensors["audio_injector.injector.1.q.qweight"] = torch.randint(-127, 127, (64, 64), generator=g, dtype=torch.int8)
    tensors["text_embedding.0.weight"] = torch.randn(64, 32, generator=g).bfloat16()
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors",
              metadata={"format": "lowvram", "version": "1", "scheme": "int8"})
    r = _run("--profile", "4090", "--ckpt-dir", tmp_path, "--size", "64*64")
    assert r.exit_code == 0, r.output
    assert "estimated" not in r.output and "blocks resident: 0-3" in r.output
    r = _run("--profile", "h100-80", "--ckpt-dir", tmp_path, "--size", "64*64")
    assert r.exit_code == 2 and "quantized as int8" in r.output


def test_profiles_cmd_lists_one_line_each():
    r = CliRunner().invoke(profiles_cmd, [])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == NAMES + ["auto"]
    line = {ln.split()[0]: ln for ln in lines}
    assert line["4090"].split()[4:8] == ["KV", "host/kv8", "attention", "triton8"] and "batched" in line["4090"]  # auto, sm_89
    assert line["h100-80"].split()[4:8] == ["KV", "gpu/bf16", "attention", "sdpa"]


@pytest.mark.parametrize("attention", ["sdpa", "triton8"])
def test_a_batched_schedule_plans_the_batch_and_shares_the_streamed_blocks(attention):
    """schedule=batched: one DiT call runs a tick's 4 forwards; activations and KV windows (bf16, or kv8 for the
    8-bit kernel) are planned for 4, and a streamed block crosses PCIe once per call, so its bytes per forward are
    a quarter."""
    over = dict(vram_budget_gib=40.0, blocks_resident=20, attention=attention)
    seq = make_plan(Profile.from_name("16gb", schedule="sequential", **over), FULL, 704, 384)
    bat = make_plan(Profile.from_name("16gb", schedule="batched", **over), FULL, 704, 384)
    assert (seq.batch, bat.batch, bat.schedule) == (1, 4, "batched") and seq.streamed == bat.streamed
    streamed = sum(seq.block_bytes[i] for i in seq.streamed)
    kv = 40 * (12672 - 3168) * ref_kv_token("int8")
    assert seq.pcie_h2d_bytes == streamed + kv and bat.pcie_h2d_bytes == streamed // 4 + kv
    assert bat.pcie_h2d_bytes_at(1) == seq.pcie_h2d_bytes and seq.pcie_h2d_bytes_at(4) == bat.pcie_h2d_bytes
    act = {b: forward_activation_bytes(FULL, 3168, 12672 + 2640, 2640, attention, b) for b in (1, 4)}
    win = {p.batch: next(it.nbytes for it in p.items if it.what.startswith("KV working")) for p in (seq, bat)}
    # K+V of one slot; sdpa's bf16 slots also hold the sink behind the window (HostKVCache.joined)
    window = 12672 * ref_kv_token("int8") if attention == "triton8" else (12672 + 2640) * ref_kv_token("bf16")
    assert (seq.kv_slots, bat.kv_slots) == (2, 5) and win[4] - win[1] == 3 * window  # a layer's 4 windows + 1
    assert act[4] > 3 * act[1] and bat.generate_peak_bytes > seq.generate_peak_bytes
    # a rank of the timestep-forcing pipeline holds only its own step's cache
    rank = make_plan(Profile.from_name("16gb", schedule="sequential", **over), FULL, 704, 384, steps=(2,))
    host = {p.steps: next(it.nbytes for it in p.items if it.what.startswith("KV ring")) for p in (seq, rank)}
    assert rank.kv_caches == ("host",) and host[(2,)] * 4 == host[(0, 1, 2, 3)]
    assert "schedule batched: 4 forward(s) per DiT call" in render_plan(bat)


def test_plan_cli_shows_batched_and_sequential_bytes_and_the_batched_targets(ckpt):
    """`lowvram plan` prints both schedules' PCIe bytes per forward and peaks; batched plans at 704x384 keep the
    memory targets (4090 <= 22.0 GiB, 12gb <= 11.5 GiB) and move fewer bytes per forward than sequential ones."""
    import re

    r = _run("--profile", "12gb", "--ckpt-dir", ckpt, "--size", "704*384", "--set", "schedule=sequential")
    assert r.exit_code == 0, r.output
    seq_in = float(re.search(r"PCIe per forward: ([\d.]+) GB in", r.output).group(1))
    m = re.search(r"schedule batched instead \((\d) per call.*PCIe per forward ([\d.]+) GB in, expected peak "
                  r"([\d.]+) GiB", r.output)
    assert m, r.output
    assert int(m.group(1)) in (2, 4) and float(m.group(2)) < seq_in and float(m.group(3)) <= 11.5
    r = _run("--profile", "4090", "--ckpt-dir", ckpt, "--size", "704*384")  # batched by default (measured faster)
    assert r.exit_code == 0 and "schedule batched: 4 forward(s)" in r.output
    assert "schedule sequential instead (1 per call" in r.output
    for name, target in (("4090", 22.0), ("16gb", 14.5), ("12gb", 11.5)):
        seq = make_plan(Profile.from_name(name, schedule="sequential"), FULL, 704, 384)
        bat = make_plan(Profile.from_name(name), FULL, 704, 384)
        assert bat.schedule == "batched", name  # the profiles' default: faster in BENCHMARKS.md run F
        assert bat.batch > 1 and bat.peak_bytes <= target * GIB and bat.pcie_h2d_bytes < seq.pcie_h2d_bytes, name


def test_vae_overlap_plans_both_activations_and_auto_falls_back():
    """on: the decode's activations beside the DiT's (their sum); off: the larger; auto: on where it fits, else off
    (12gb at 832x480 fits only serially); a process without the decoder never overlaps."""
    def act(plan):
        return next(it for it in plan.items if it.what.startswith("activations"))

    on = make_plan(Profile.from_name("4090", vae_overlap="on"), FULL, 704, 384)
    off = make_plan(Profile.from_name("4090", vae_overlap="off"), FULL, 704, 384)
    auto = make_plan(Profile.from_name("4090", vae_overlap="auto"), FULL, 704, 384)
    assert not make_plan(Profile.from_name("4090"), FULL, 704, 384).vae_overlap  # the profiles' default: off
    assert on.vae_overlap and not off.vae_overlap and auto.vae_overlap
    dit = forward_activation_bytes(FULL, 3168, 12672 + 2640, 2640, on.attention, on.batch)
    assert act(on).nbytes > act(off).nbytes == max(dit, act(on).nbytes - dit) and "overlapped" in act(on).what
    assert len(on.resident) <= len(off.resident) and on.peak_bytes <= 21.5 * GIB
    assert auto.resident == on.resident and auto.batch == on.batch
    with pytest.raises(LowvramError, match="smallest budget that fits"):
        make_plan(Profile.from_name("12gb", vae_overlap="on"), FULL, 832, 480)
    tight = make_plan(Profile.from_name("12gb", vae_overlap="auto"), FULL, 832, 480)
    assert not tight.vae_overlap and tight.peak_bytes <= 11.2 * GIB
    rank = make_plan(Profile.from_name("4090", vae_overlap="on"), FULL, 704, 384, decode=False)
    assert not rank.vae_overlap


def test_fast_decode_falls_back_to_lean_where_its_memory_costs_blocks():
    """vae_decode "fast" (CUDA graphs, wide conv outputs) is kept where it costs nothing (the 4090 plan at 704x384:
    the batched DiT's activations are larger); where it would cost resident blocks or the fit (the 12gb plan at
    832x480) the plan takes "lean", whose activations are planned smaller; "lean" and "frame" stay as said."""
    from lowvram.runtime.planner import Sizes, vae_activation_bytes

    p4090 = make_plan(Profile.from_name("4090", vae_decode="fast"), FULL, 704, 384)
    assert p4090.profile.vae_decode == "fast"
    assert make_plan(Profile.from_name("h100-80"), FULL, 704, 384).profile.vae_decode == "fast"
    forced = make_plan(Profile.from_name("12gb", vae_decode="lean"), FULL, 832, 480)
    auto = make_plan(Profile.from_name("12gb", vae_decode="fast"), FULL, 832, 480)
    assert auto.profile.vae_decode == "lean" and auto.resident == forced.resident
    sizes = Sizes()
    assert vae_activation_bytes(sizes, "lean", 832, 480) < vae_activation_bytes(sizes, "fast", 832, 480)
    assert make_plan(Profile.from_name("4090", vae_decode="frame"), FULL, 704, 384).profile.vae_decode == "frame"
