"""The batched schedule end to end (tiny checkpoint, CPU, fp32): `Engine.run_works` runs a tick as one DiT
call and streams each non-resident block once per call; the planned KV workspace is the one allocated; and
sequential and batched runs write bit-identical frames (`run`, `lowvram run --set schedule=batched`),
with online decode (two clips: the drain at clip 1), and a stop after an odd number of blocks."""

from dataclasses import replace

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.io.weights import load_dit
from lowvram.pipeline.options import RunOptions
from lowvram.pipeline.run import run
from lowvram.runtime.engine import Engine
from lowvram.runtime.planner import make_plan
from lowvram.runtime.profile import Profile
from lowvram.runtime.schedule import BlockIndex, ticks

HW = (16, 16)


def _plan(model, schedule, **kw):  # sdpa unless said: the 12gb profile's "auto" is triton8 on its card
    prof = Profile.from_name("12gb", quant="bf16", schedule=schedule, **{"attention": "sdpa", **kw})
    return make_plan(prof, model.cfg, HW[1] * 8, HW[0] * 8, sink_dtype="bf16")


def _engine(tiny_ckpt, schedule, dtype=torch.bfloat16, **kw):
    ckpt, lora = tiny_ckpt
    model = load_dit(ckpt, lora=lora, dtype=dtype)
    engine = Engine.build(model, _plan(model, schedule, **kw), "cpu")
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(6, model.cfg.text_dim, generator=g)
    ref, mot = torch.randn(1, 16, 1, *HW, generator=g), torch.randn(1, 16, 19, *HW, generator=g)
    engine.start(ctx, ref, mot, 4, seed=420)
    return engine


def _denoise(engine, num_blocks, drain=()):
    """The session's tick loop without decoding: every block's clean latents, and the DiT calls made."""
    cfg, done, latents, calls = engine.model.cfg, {}, {}, 0
    g = torch.Generator().manual_seed(1)
    audio = {b: torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=g) for b in range(num_blocks)}
    for tick in ticks(num_blocks, 4, drain_before=drain):
        xs = [latents.pop(w.idx) if w.step else engine.initial_latents(w.idx) for w in tick]
        outs = engine.run_works(tick, xs, [audio[4 * w.idx.clip + w.idx.block] for w in tick])
        calls += -(-len(tick) // engine.plan.batch)
        for w, x in zip(tick, outs):
            (done if w.step == 3 else latents)[w.idx] = x
    return done, calls


@pytest.mark.parametrize("dtype, kv", [(torch.bfloat16, "bf16"), (torch.bfloat16, "int8"), (torch.float32, "int8"),
                                       (torch.bfloat16, "kv8")])
def test_run_works_batches_a_tick_and_streams_each_block_once_per_call(tiny_ckpt, dtype, kv, torch_attention):
    """bf16 and fp32 models, 1 block resident (3 stream), host step caches (bf16, int8, and kv8 read by the 8-bit
    attention; its torch fallback here): the batched engine's latents equal the sequential engine's bit for bit
    over 7 blocks (fill, steady ticks of 4, ring wrap, drain), and the streamer copies each streamed block once
    per DiT call instead of once per forward."""
    ov = dict(kv_dtype="int8", attention="triton8") if kv == "kv8" else dict(kv_dtype=kv)
    seq = _engine(tiny_ckpt, "sequential", dtype, blocks_resident=1, **ov)
    bat = _engine(tiny_ckpt, "batched", dtype, blocks_resident=1, **ov)
    assert seq.plan.kv_format == bat.plan.kv_format == kv
    assert (seq.plan.batch, bat.plan.batch) == (1, 4) and len(bat.streamer.streamed) == 3
    assert bat.kv[0].ws.n_slots == 5 and seq.kv[0].ws.n_slots == 2  # one layer's windows of the batch + 1
    for e in (seq, bat):
        e.streamer.reset_stats()
    want, seq_calls = _denoise(seq, 7)
    got, bat_calls = _denoise(bat, 7)
    assert (seq_calls, bat_calls) == (28, 10)  # 7 x 4 forwards; 7 + 3 ticks
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    n = len(bat.streamer.streamed)
    for e, calls in ((seq, seq_calls), (bat, bat_calls)):  # + the next call's first blocks, prefetched
        assert calls * n <= e.streamer.loads <= calls * n + e.plan.n_buffers
    assert bat.stats()["kv"]["bytes_h2d"] == seq.stats()["kv"]["bytes_h2d"] > 0  # windows: the same bytes


def test_more_kv_layers_in_flight_keep_the_frames(tiny_ckpt, torch_attention):
    """kv_layers_ahead=3: the host caches' ring holds one more layer of windows (batch 4: 6 slots, sequential: 3),
    planned as allocated, and the latents are the two-layer ring's bit for bit."""
    base = _engine(tiny_ckpt, "batched", kv_dtype="int8", blocks_resident=1)
    deep = _engine(tiny_ckpt, "batched", kv_dtype="int8", blocks_resident=1, kv_layers_ahead=3)
    seq = _engine(tiny_ckpt, "sequential", kv_dtype="int8", blocks_resident=1, kv_layers_ahead=3)
    assert (base.kv[0].ws.n_slots, deep.kv[0].ws.n_slots, seq.kv[0].ws.n_slots) == (5, 6, 3)
    for e in (base, deep, seq):
        assert e.plan.kv_slots == e.kv[0].ws.n_slots
    item = {e: next(it.nbytes for it in e.plan.items if it.what.startswith("KV working windows")) for e in (base, deep)}
    assert item[deep] > item[base]
    want, _ = _denoise(base, 5)
    for e in (deep, seq):
        got, _ = _denoise(e, 5)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("schedule", ["sequential", "batched"])
def test_each_block_s_audio_is_encoded_once_for_its_four_steps(tiny_ckpt, schedule, monkeypatch):
    """The engine encodes a block's audio at its first step and reuses the tokens in its other three (they depend on
    the block's audio only): 6 blocks, 6 encodings instead of 24, nothing kept after a block's last step, and the
    latents bit for bit those of calls that each encode their features (the model's own path). Control: handing a
    block the tokens of another block changes its latents, so the comparison can fail."""
    eng = _engine(tiny_ckpt, schedule, kv_dtype="bf16")
    got, _ = _denoise(eng, 6)
    assert eng.audio_encodes == 6 and eng.audio == {}

    per_call = _engine(tiny_ckpt, schedule, kv_dtype="bf16")
    monkeypatch.setattr(per_call, "done_with", lambda idx, i: per_call.audio.pop(idx))  # forget after every step
    want, _ = _denoise(per_call, 6)
    assert per_call.audio_encodes == 24
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    if schedule == "sequential":  # a run of fewer steps than the plan holds: its last step lets the tokens go
        few = _engine(tiny_ckpt, schedule, kv_dtype="bf16")
        g = torch.Generator().manual_seed(2)
        few.start(torch.randn(6, few.model.cfg.text_dim, generator=g), torch.randn(1, 16, 1, *HW, generator=g),
                  torch.randn(1, 16, 19, *HW, generator=g), 2, seed=420)
        for b in range(2):
            few.denoise_block(BlockIndex(0, b), torch.randn(1, few.model.cfg.num_audio_layers,
                                                              few.model.cfg.audio_dim, 12, generator=g))
            assert few.audio == {} and few.audio_encodes == b + 1

    wrong = _engine(tiny_ckpt, schedule, kv_dtype="bf16")
    first = {}
    monkeypatch.setattr(wrong, "audio_tokens", lambda idx, f: first.setdefault(0, wrong.model.encode_audio(f)))
    wrong.plan = replace(wrong.plan, batch=1)  # (one block's tokens: calls of one)
    bad, _ = _denoise(wrong, 6)
    assert not all(torch.equal(want[k], bad[k]) for k in want)


def test_a_smaller_batch_splits_the_tick_and_the_frames_stay(tiny_ckpt):
    """A plan of batch 2 runs a 4-work tick as two calls (the 12gb profile at 704x384 plans batch 2)."""
    seq = _engine(tiny_ckpt, "sequential", kv_dtype="bf16")
    two = _engine(tiny_ckpt, "batched", kv_dtype="bf16")
    two.plan = replace(two.plan, batch=2)
    want, _ = _denoise(seq, 5, drain=[4])
    got, calls = _denoise(two, 5, drain=[4])
    # blocks 0..3: ticks of 1, 2, 3, 4, 3, 2, 1 works -> 10 calls of <= 2; block 4 (after the drain): 4 ticks of 1
    assert calls == 14 and want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("attention", ["sdpa", "triton8"])
def test_the_planned_kv_workspace_is_the_allocated_one(tiny_ckpt, attention):
    """`kv_workspace_bytes` in the plan = what the engine allocates for the plan's batch (INT8 host caches:
    windows, staging and write-back chunk, plus the write-back's fp32 quantization temporaries; kv8: windows in
    the kernel's format, V/scale staging and write-back chunk), and kv8's planned K means are the caches'."""
    for schedule in ("sequential", "batched"):
        engine = _engine(tiny_ckpt, schedule, kv_dtype="int8", attention=attention)
        plan, ws = engine.plan, engine.kv[0].ws
        item = next(it for it in plan.items if it.what.startswith("KV working windows"))
        hd = engine.model.cfg.num_heads * engine.model.cfg.head_dim
        assert ws.n_slots == plan.kv_slots == plan.batch + 1
        temps = 3 * ws.max_new * hd * 4 if attention == "sdpa" else 0
        assert item.nbytes == ws.nbytes() + temps
        assert all(c.ws is ws for c in engine.kv)
        means = [it.nbytes for it in plan.items if it.what.startswith("kv8 K smoothing")]
        assert means == ([sum(c.k_mean.numel() * 4 for c in engine.kv)] if attention == "triton8" else [])


# ------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    synth_portrait(str(d / "face.png"), width=160, height=160, seed=2)
    synth_voice(str(d / "voice.wav"), seconds=4.0, seed=2)
    return d


def _opts(tiny_ckpt, inputs, out, **kw):
    ckpt, lora = tiny_ckpt
    base = dict(ckpt_dir=ckpt, lora=lora, image=inputs / "face.png", audio=inputs / "voice.wav",
                prompt="a person talking", size="128*128", num_clip=2, out=out, device="cpu")
    return RunOptions(**{**base, **kw})


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def sequential(tiny_ckpt, inputs, tmp_path_factory):
    """Two clips (8 blocks), online decode (the sink refreshed at clip 1), the sequential schedule."""
    out = tmp_path_factory.mktemp("seq") / "s.mp4"
    res = run(_opts(tiny_ckpt, inputs, out, online_decode=True), log=lambda *a: None)
    assert res.clips == 2 and res.blocks == 8 and res.plan["batch"] == 1
    return res


def test_batched_run_writes_the_sequential_frames(sequential, tiny_ckpt, inputs, tmp_path):
    res = run(_opts(tiny_ckpt, inputs, tmp_path / "b.mp4", online_decode=True, overrides=("schedule=batched",)),
              log=lambda *a: None)
    assert res.plan["batch"] == 4 and res.blocks == 8 and res.frames == sequential.frames == 2 * 48 - 3
    assert np.array_equal(_frames(res.out), _frames(sequential.out))


def test_cli_batched_run_writes_the_sequential_frames(sequential, tiny_ckpt, inputs, tmp_path):
    ckpt, lora = tiny_ckpt
    out = tmp_path / "cli.mp4"
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image", str(inputs / "face.png"),
                                 "--audio", str(inputs / "voice.wav"), "--prompt", "a person talking", "--size",
                                 "128*128", "--num-clip", "2", "--device", "cpu", "--online-decode", "--set", "schedule=batched",
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(_frames(out), _frames(sequential.out))


def test_a_stop_ends_a_batched_run_at_a_block_boundary(sequential, tiny_ckpt, inputs, tmp_path):
    """Stopping after 5 blocks (clip 1's blocks 5..7 are being denoised): the tick in flight finishes, the partial
    blocks are dropped, and the file holds exactly the 5 finished blocks, the sequential run's frames."""
    from lowvram.pipeline.session import Session

    done = []
    session = Session(log=lambda *a: None)
    try:
        res = session.run(_opts(tiny_ckpt, inputs, tmp_path / "i.mp4", online_decode=True,
                                overrides=("schedule=batched",)),
                          on_block=lambda ev: done.append(ev.blocks_done), should_stop=lambda: len(done) >= 5)
    finally:
        session.close()
    assert res.interrupted and res.blocks == 5 and done == [1, 2, 3, 4, 5]
    frames = _frames(res.out)
    assert frames.shape[0] == 5 * 12 - 3 == res.frames
    assert np.array_equal(frames, _frames(sequential.out)[:frames.shape[0]])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_overlapped_decode_writes_the_serial_frames(tiny_ckpt, inputs, tmp_path, device):
    """vae_overlap on (on CUDA each block decodes on its own stream beside the next DiT call, uint8 frames back to
    the host) and off (between DiT calls) write the same frames; one clip: the first block's dropped frames."""
    runs = {}
    for mode in ("on", "off"):
        res = run(_opts(tiny_ckpt, inputs, tmp_path / f"{mode}.mp4", num_clip=1, device=device,
                        overrides=("schedule=batched", f"vae_overlap={mode}")), log=lambda *a: None)
        assert res.plan["vae_overlap"] == (mode == "on") and res.blocks == 4 and res.frames == 48 - 3
        runs[mode] = _frames(res.out)
    assert runs["on"].shape[0] == 45 and np.array_equal(runs["on"], runs["off"])
