"""The DiT placed by `Engine.build` as a plan says (streamed blocks, host KV caches) computes what the
resident model does; a CUDA OOM moves one more block to streaming and retries (CPU: synchronous copies,
same code); the engine, not a process global, carries the GEMM and attention backends."""

import pytest
import torch

from lowvram.io.weights import load_dit
from lowvram.runtime.engine import Engine
from lowvram.runtime.planner import make_plan
from lowvram.runtime.profile import Profile

HW = (16, 16)


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt, dev = model.dtype, model.patch_embedding.weight.device
    ctx = model.embed_text([torch.randn(6, model.cfg.text_dim, generator=g).to(dev)])
    ref = torch.randn(1, 16, 1, *HW, generator=g).to(dev, dt)
    mot = torch.randn(1, 16, 19, *HW, generator=g).to(dev, dt)
    xs = [torch.randn(1, 16, 3, *HW, generator=g).to(dev, dt) for _ in range(5)]
    audio = torch.randn(1, model.cfg.num_audio_layers, model.cfg.audio_dim, 12, generator=g).to(dev)
    return ctx, ref, mot, xs, audio


def _run(model, engine, seed=0):
    ctx, ref, mot, xs, audio = _inputs(model, seed)
    sink = model.prefill_sink(ref, mot, ctx)
    outs = []
    for b, x in enumerate(xs):  # 5 blocks: the 12-frame ring wraps at block 4
        for i, kv in enumerate(engine.kv[:2]):
            t = torch.full((1, 3), 500.0 + i, device=x.device)
            outs.append(engine.guarded(lambda: model(x, t, ctx, audio, kv, sink, 3 * b, 9)).cpu())
    return outs


def _plan(model, **kw):  # sdpa unless said: the 12gb profile's "auto" is triton8 on its card
    prof = Profile.from_name("12gb", quant="bf16", **{"attention": "sdpa", **kw})
    return make_plan(prof, model.cfg, HW[1] * 8, HW[0] * 8, sink_dtype="bf16")


def _resident(model, device):
    """Everything on the device (the preset of a run without --profile)."""
    plan = make_plan(Profile.resident("bf16", 1024.0), model.cfg, HW[1] * 8, HW[0] * 8)
    return Engine.build(model, plan, device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_streamed_blocks_and_host_kv_equal_the_resident_model(tiny_ckpt, device):
    """bf16, as on the GPU (the host caches hold bf16): bit-identical outputs."""
    ckpt, lora = tiny_ckpt
    bf = torch.bfloat16
    resident = load_dit(ckpt, lora=lora, dtype=bf)
    want = _run(resident, _resident(resident, device))
    model = load_dit(ckpt, lora=lora, dtype=bf)
    plan = _plan(model, blocks_resident=1, kv_dtype="bf16")
    assert len(plan.streamed) == model.cfg.num_layers - 1 and set(plan.kv_caches) == {"host"}
    engine = Engine.build(model, plan, device)
    got = _run(model, engine)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert engine.streamer.stats()["bytes_h2d"] > 0


def test_int8_host_kv_stays_close(tiny_ckpt):
    ckpt, lora = tiny_ckpt
    resident = load_dit(ckpt, lora=lora, dtype=torch.float32)
    want = _run(resident, _resident(resident, "cpu"))
    model = load_dit(ckpt, lora=lora, dtype=torch.float32)
    got = _run(model, Engine.build(model, _plan(model, blocks_resident="auto", kv_dtype="int8"), "cpu"))
    ref, approx = torch.stack(want), torch.stack(got)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())
    assert sqnr > 30, f"{sqnr:.1f} dB"


@pytest.mark.parametrize("dtype, device", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"),
                                           pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.cuda)])
def test_triton8_host_caches_equal_the_device_caches(tiny_ckpt, dtype, device, torch_attention):
    """attention=triton8: with the step caches in host memory (kv8 windows streamed to the device and read by the
    8-bit attention as they land) the model computes, bit for bit, what it computes with them on the device in
    the same format (5 blocks: the ring wraps; two step caches share the workspace; blocks streamed too). The
    attention is the kernel's torch fallback on the CPU (tests/test_kv_cache.py runs the kernel itself over both
    kinds of window), the compiled kernel on CUDA (with the copy streams and pinned memory)."""
    ckpt, lora = tiny_ckpt
    outs, kinds = [], []
    for kw in (dict(kv_placement="gpu", kv_dtype="bf16", blocks_resident="all"),
               dict(kv_placement="host", kv_dtype="int8", blocks_resident=1)):
        model = load_dit(ckpt, lora=lora, dtype=dtype)
        plan = _plan(model, attention="triton8", **kw)
        assert plan.kv_format == "kv8" and set(plan.kv_caches) == {kw["kv_placement"]}
        engine = Engine.build(model, plan, device)
        outs.append(_run(model, engine))
        kinds.append((type(engine.kv[0]).__name__, engine.stats().get("kv", {}).get("bytes_h2d", 0) > 0))
    assert kinds == [("GpuKV8Cache", False), ("HostKVCache", True)]
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and outs[0][-1].abs().sum() > 0


def test_oom_moves_one_more_block_to_streaming_and_retries(tiny_ckpt):
    ckpt, lora = tiny_ckpt
    model = load_dit(ckpt, lora=lora, dtype=torch.float32)
    engine = Engine.build(model, _plan(model, blocks_resident=3, kv_dtype="bf16"), "cpu", log=lambda *a: None)
    before = len(engine.streamer.streamed)
    calls = []

    def forward():
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("fake: over the budget")
        return "ok"

    assert engine.guarded(forward) == "ok"
    assert len(calls) == 2 and len(engine.streamer.streamed) == before + 1


def test_a_features_tensor_is_sliced_by_clip_and_block(tiny_ckpt):
    """Features of the whole video in one tensor [1, L, D, 48 N] (benchmarks pass one): block b of clip r
    gets frames 48 r + 12 b .. + 12, not the whole tensor clamped (Tensor.clip is clamp)."""
    from lowvram.demo.tiny import tiny_config
    from lowvram.pipeline.encode import block_audio, clip_source
    from lowvram.runtime.schedule import BlockIndex

    cfg = tiny_config()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 48 * 3, generator=g)
    source = clip_source(feats)
    for clip, block in ((0, 0), (1, 2), (2, 3)):
        start = 48 * clip + 12 * block
        assert torch.equal(block_audio(source, BlockIndex(clip, block)), feats[..., start:start + 12])


def test_the_engine_carries_the_plan_gemm_and_attention_on_its_own_model(tiny_ckpt, tmp_path):
    """No process global: the plan's GEMM backend is set on the engine's QuantLinear modules only."""
    from lowvram.quantize.convert import convert
    from lowvram.quantize.format import quantized_module_names
    from lowvram.quantize.linear import QuantLinear

    ckpt, lora = tiny_ckpt
    qdir = tmp_path / "q"
    convert(ckpt, qdir, "int8", lora=lora, progress=False)
    names = quantized_module_names(qdir)
    model, other = (load_dit(qdir, quantized=names, dtype=torch.float32) for _ in range(2))
    plan = make_plan(Profile.resident("int8", 1024.0, gemm="reference", attention="triton"), model.cfg,
                     HW[1] * 8, HW[0] * 8)
    Engine.build(model, plan, "cpu")
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and {m.backend for m in mods} == {"reference"} and model.attention == "triton"
    assert {m.backend for m in other.modules() if isinstance(m, QuantLinear)} != {"reference"}
    assert other.attention == "sdpa"
