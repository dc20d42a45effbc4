"""A streaming DiT forward makes no host<->device synchronisation on CUDA: a B = 1 forward is launch-bound (the
host's enqueue takes about as long as the GPU's work), so each sync empties the GPU's queue. Under
torch.cuda.set_sync_debug_mode("error") any blocking copy (a pageable tensor to the GPU, .item(), int() of a
device tensor), stream or device synchronize raises. The engine's ticks (Engine.run_works: `step` at B = 1,
`_batched` for a tick's call) run after a warm-up (Triton compilation and autotuning, cuDNN plans: the same
calls, so the same shapes), with GPU step caches (with and without the sink room) and host caches (their copy
streams are ordered by events, never a synchronize). Not checked: the video's start (the sink prefill, the
text embedding, the noise), which syncs freely."""

import dataclasses

import pytest
import torch

from lowvram.io.weights import load_dit
from lowvram.runtime.engine import Engine
from lowvram.runtime.planner import make_plan
from lowvram.runtime.profile import Profile
from lowvram.runtime.schedule import block_of, ticks

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HW = (16, 16)
BLOCKS = 6  # two clips: the 12-frame rings wrap at block 4


def _plan(cfg, kind: str, schedule: str, quant: str = "bf16"):
    if kind.startswith("gpu"):
        plan = make_plan(Profile.resident(quant, 1024.0, schedule=schedule), cfg, HW[1] * 8, HW[0] * 8)
        assert plan.gpu_kv_sink == plan.tokens["sink"]
        return dataclasses.replace(plan, gpu_kv_sink=0) if kind == "gpu-noroom" else plan
    kv_dtype = kind.removeprefix("host-")
    prof = Profile.from_name("12gb", quant=quant, attention="sdpa", kv_dtype=kv_dtype, blocks_resident="all",
                             schedule=schedule)
    return make_plan(prof, cfg, HW[1] * 8, HW[0] * 8)


def _video(engine, inputs, sync_mode: str | int = 0):
    """The start of a video (unchecked), then every tick of BLOCKS blocks x 4 steps under `sync_mode`."""
    ctx, ref, mot, audios = inputs
    engine.start(ctx, ref, mot, 4, seed=3)
    x = {block_of(g): engine.initial_latents(block_of(g)) for g in range(BLOCKS)}  # the blocks' noise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(sync_mode)
    try:
        for tick in ticks(BLOCKS, 4):
            xs = [x[w.idx] for w in tick]
            outs = engine.run_works(tick, xs, [audios[4 * w.idx.clip + w.idx.block] for w in tick])
            x.update({w.idx: o for w, o in zip(tick, outs)})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return [x[k].cpu() for k in sorted(x, key=lambda i: (i.clip, i.block))]


CASES = [("gpu", "sequential"), ("gpu", "batched"), ("gpu-noroom", "batched"), ("host-bf16", "sequential"),
         ("host-bf16", "batched"), ("host-int8", "batched")]


@pytest.mark.parametrize("kind, schedule", CASES)
def test_streaming_ticks_make_no_host_device_sync(tiny_ckpt, kind, schedule, video_inputs):
    ckpt, lora = tiny_ckpt
    model = load_dit(ckpt, lora=lora, dtype=torch.bfloat16)
    plan = _plan(model.cfg, kind, schedule)
    assert set(plan.kv_caches) == {"gpu" if kind.startswith("gpu") else "host"}
    assert plan.batch == (1 if schedule == "sequential" else 4) and not plan.streamed
    engine = Engine.build(model, plan, "cuda")
    inputs = video_inputs(model.cfg, BLOCKS, HW)
    warm = _video(engine, inputs)
    checked = _video(engine, inputs, "error")  # raises on the first sync
    assert all(torch.equal(a, b) for a, b in zip(warm, checked))


def test_w8a8_fp8_ticks_make_no_host_device_sync(tiny_ckpt, tmp_path, video_inputs):
    """h100-80's path: FP8 W8A8 (the norms' shared 8-bit inputs, the GEMMs), GPU bf16 caches with the sink room,
    batched ticks."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89 or newer")
    from lowvram.quantize.convert import convert
    from lowvram.quantize.format import quantized_module_names

    ckpt, lora = tiny_ckpt
    qdir = tmp_path / "fp8"
    convert(ckpt, qdir, "fp8", lora=lora, progress=False)
    model = load_dit(qdir, quantized=quantized_module_names(qdir), dtype=torch.bfloat16)
    engine = Engine.build(model, _plan(model.cfg, "gpu", "batched", quant="fp8"), "cuda")
    inputs = video_inputs(model.cfg, BLOCKS, HW)
    warm = _video(engine, inputs)
    checked = _video(engine, inputs, "error")
    assert all(torch.equal(a, b) for a, b in zip(warm, checked))
