"""`lowvram run` end to end on the tiny checkpoint: frame count, A/V, determinism, interruption,
the prompt cache, and every bad input (exit code 2, one line, nothing written)."""

import os
import signal
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.pipeline.options import RunOptions
from lowvram.pipeline.run import run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    synth_portrait(str(d / "face.png"), width=160, height=160, seed=1)
    synth_voice(str(d / "voice.wav"), seconds=2.0, seed=1)
    synth_voice(str(d / "short.wav"), seconds=0.2, seed=1)
    import wave
    with wave.open(str(d / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 32000)
    (d / "not_an_image.png").write_text("hello")
    return d


def _opts(tiny_ckpt, inputs, out, **kw):
    ckpt, lora = tiny_ckpt
    base = dict(ckpt_dir=ckpt, lora=lora, image=inputs / "face.png", audio=inputs / "voice.wav",
                prompt="a person talking", size="128*128", out=out, device="cpu")
    return RunOptions(**{**base, **kw})


def _frames(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        fps = float(v.average_rate)
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        audio_s = sum(f.samples for f in c.decode(audio=0)) / a.rate
    return np.stack(frames), fps, audio_s


@pytest.fixture(scope="module")
def first(tiny_ckpt, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a.mp4"
    return run(_opts(tiny_ckpt, inputs, out), log=lambda *a: None)


def test_video_has_48n_minus_3_frames_at_25_fps_with_matching_audio(first):
    assert first.clips == 2 and not first.interrupted
    frames, fps, audio_s = _frames(first.out)
    assert frames.shape[0] == 48 * 2 - 3 == first.frames
    assert frames.shape[1:] == (128, 128, 3)
    assert fps == 25
    assert abs(audio_s - frames.shape[0] / 25) < 0.08          # cut to the video (AAC tail < 64 ms)
    assert frames.std() > 1                                    # not a blank video


def test_same_seed_same_frames_other_seed_other_frames(first, tiny_ckpt, inputs, tmp_path):
    again = run(_opts(tiny_ckpt, inputs, tmp_path / "b.mp4"), log=lambda *a: None)
    assert np.array_equal(_frames(first.out)[0], _frames(again.out)[0])
    other = run(_opts(tiny_ckpt, inputs, tmp_path / "c.mp4", seed=7, num_clip=1), log=lambda *a: None)
    a, b = _frames(first.out)[0][:45], _frames(other.out)[0]
    assert b.shape[0] == 45 and not np.array_equal(a, b)


class _InterruptAfter:
    """A progress sink that sends this process a signal (SIGINT by default) after k blocks."""

    def __init__(self, k, sig=signal.SIGINT):
        self.k, self.sig = k, sig

    def start(self, **kw):
        pass

    def block_done(self, clip, block, frames, seconds, peak):
        self.k -= 1
        if self.k == 0:
            os.kill(os.getpid(), self.sig)

    def finish(self):
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_keeps_a_playable_file_with_the_finished_blocks(tiny_ckpt, inputs, tmp_path, sig):
    res = run(_opts(tiny_ckpt, inputs, tmp_path / "i.mp4"), progress=_InterruptAfter(3, sig), log=lambda *a: None)
    assert res.interrupted and res.blocks == 3
    frames, fps, _ = _frames(res.out)
    assert frames.shape[0] == 3 * 12 - 3 and fps == 25


def test_prompt_cache_skips_t5_on_the_second_run(tiny_ckpt, inputs, tmp_path, monkeypatch):
    opts = _opts(tiny_ckpt, inputs, tmp_path / "p1.mp4", prompt="a cached prompt", num_clip=1)
    logs = []
    run(opts, log=logs.append)
    import lowvram.model.text_encoder as te

    def boom(*a, **k):
        raise AssertionError("T5 was loaded although the prompt is cached")

    monkeypatch.setattr(te, "load_text_encoder", boom)
    run(_opts(tiny_ckpt, inputs, tmp_path / "p2.mp4", prompt="a cached prompt", num_clip=1), log=logs.append)
    assert any("from cache" in m for m in logs)


BAD = [
    (dict(image="missing.png"), "missing.png"),
    (dict(image="not_an_image.png"), "not_an_image.png"),
    (dict(audio="missing.wav"), "missing.wav"),
    (dict(audio="short.wav"), "short"),
    (dict(audio="silent.wav"), "silent"),
    (dict(size="big"), "--size"),
    (dict(size="100000*100000"), "--size"),
    (dict(num_clip="0"), "--num-clip"),
    (dict(out="no/such/dir/x.mp4"), "no/such/dir"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_ckpt, inputs, tmp_path, change, needle):
    ckpt, lora = tiny_ckpt
    args = {"image": str(inputs / "face.png"), "audio": str(inputs / "voice.wav"), "size": "128*128",
            "num_clip": "1", "out": str(tmp_path / "o.mp4")}
    for k, v in change.items():
        args[k] = str(inputs / v) if k in ("image", "audio") else (str(tmp_path / v) if k == "out" else v)
    argv = ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--prompt", "x", "--device", "cpu", "--quiet"]
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}", v]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert not any(Path(tmp_path).iterdir())


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_checkpoint_runs_and_stays_close(first, tiny_ckpt, inputs, tmp_path, scheme):
    from lowvram.quantize.convert import convert

    ckpt, lora = tiny_ckpt
    qdir = tmp_path / f"q-{scheme}"
    convert(ckpt, qdir, scheme, lora=lora, progress=False)
    res = run(_opts(tiny_ckpt, inputs, tmp_path / "q.mp4", ckpt_dir=qdir, lora=None, num_clip=1),
              log=lambda *a: None)
    frames, fps, _ = _frames(res.out)
    assert frames.shape[0] == 45 and fps == 25
    ref = _frames(first.out)[0][:45].astype(np.float64)
    err = np.abs(frames.astype(np.float64) - ref).mean()
    assert 0 < err < 20, err           # same seed: close to the bf16-merged run, not identical


def test_online_decode_refreshes_the_sink_at_clip_1(first, tiny_ckpt, inputs, tmp_path):
    res = run(_opts(tiny_ckpt, inputs, tmp_path / "o.mp4", online_decode=True), log=lambda *a: None)
    a, b = _frames(first.out)[0], _frames(res.out)[0]
    assert a.shape == b.shape
    assert np.array_equal(a[:45], b[:45])          # clip 0 is generated before the refresh
    assert not np.array_equal(a[45:], b[45:])      # clip 1 sees the new ref + motion sink


def test_quantized_t5_prints_its_cosine_against_bf16_once(tiny_ckpt, inputs, tmp_path, monkeypatch):
    from lowvram.io.weights import discover
    from lowvram.pipeline.encode import encode_prompt

    # an own cache: the note is per T5 file (its inode), which the quantized copies of the tiny checkpoint
    # that other tests make share through hard links
    monkeypatch.setenv("LOWVRAM_CACHE", str(tmp_path / "cache"))
    logs = []
    ckpt = discover(tiny_ckpt[0])
    import torch
    for prompt in ("first prompt for int8", "second prompt for int8"):
        ctx = encode_prompt(ckpt, prompt, torch.device("cpu"), "int8", logs.append)
        assert ctx.ndim == 2 and torch.isfinite(ctx).all()
    lines = [m for m in logs if "cosine against bf16" in m]
    assert len(lines) == 1
    cos = float(lines[0].split("bf16 ")[1].split()[0])
    assert 0.9 < cos <= 1.0


def test_profile_run_streams_blocks_and_sets_the_gemm_backend(tiny_ckpt, inputs, tmp_path, monkeypatch):
    """--profile 4090 on the CPU: the plan places the quantized model (2 blocks resident, host INT8 KV)."""
    import torch

    from lowvram.io.weights import discover, load_dit
    from lowvram.quantize.convert import convert
    from lowvram.quantize.format import quantized_module_names
    from lowvram.quantize.linear import QuantLinear

    ckpt, lora = tiny_ckpt
    qdir = tmp_path / "q"
    convert(ckpt, qdir, "int8", lora=lora, progress=False)
    used, forward = set(), QuantLinear.forward  # the backend of every QuantLinear call of the run
    monkeypatch.setattr(QuantLinear, "forward", lambda self, x, backend=None: used.add(self.backend) or forward(self, x))
    res = run(_opts(tiny_ckpt, inputs, tmp_path / "p.mp4", ckpt_dir=qdir, lora=None, num_clip=1,
                    profile="4090", overrides=("blocks_resident=2", "gemm=reference")), log=lambda *a: None)
    assert used == {"reference"}  # the profile's backend, on the run's modules
    other = load_dit(discover(qdir), device="cpu", dtype=torch.float32, quantized=quantized_module_names(qdir))
    mods = [m for m in other.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.backend == "auto" for m in mods)  # a second model is unaffected: no process global
    frames, fps, _ = _frames(res.out)
    assert frames.shape[0] == 45 and fps == 25


def test_profile_bad_set_is_one_line(tiny_ckpt, inputs, tmp_path):
    ckpt, lora = tiny_ckpt
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image", str(inputs / "face.png"),
                                 "--audio", str(inputs / "voice.wav"), "--prompt", "x", "--size", "128*128",
                                 "--device", "cpu", "--profile", "4090", "--set", "gemm=fastest",
                                 "--out", str(tmp_path / "o.mp4")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "gemm" in r.output
    assert not (tmp_path / "o.mp4").exists()
