"""`lowvram run --gpus N` on the CPU (gloo): the roles, every process count writing the sequential run's
frames bit for bit (fp32), the CLI, and the faults (a rank killed mid-run, a rank that raises, too many GPUs).

Every process computes on one thread (OMP_NUM_THREADS=1, and the one_thread fixture for the sequential
reference): the CPU kernels' reduction order depends on the thread count, the frames must not."""

import os
import re
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.errors import LowvramError
from lowvram.parallel.launch import Launcher, RankFailure, launch
from lowvram.parallel.roles import Pipeline, assign_roles
from lowvram.pipeline.options import RunOptions
from lowvram.pipeline.run import run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpp-inputs")
    synth_portrait(str(d / "face.png"), width=64, height=64, seed=3)
    synth_voice(str(d / "voice.wav"), seconds=1.5, seed=3)
    return d


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOWVRAM_TPP_FAULT", raising=False)


def _opts(tiny_ckpt, inputs, out, **kw):
    ckpt, lora = tiny_ckpt
    base = dict(ckpt_dir=ckpt, lora=lora, image=inputs / "face.png", audio=inputs / "voice.wav",
                prompt="a person talking", size="64*64", num_clip=1, seed=11, out=out, device="cpu")
    return RunOptions(**{**base, **kw})


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def sequential(tiny_ckpt, inputs, tmp_path_factory, one_thread):
    res = run(_opts(tiny_ckpt, inputs, tmp_path_factory.mktemp("seq") / "seq.mp4"), log=lambda *a: None)
    assert res.frames == 45 and not res.interrupted
    return _frames(res.out)


def test_roles_one_step_per_rank_from_four_and_the_writer_fifth():
    r5 = assign_roles(5)
    assert [r.steps for r in r5] == [(0,), (1,), (2,), (3,), ()]
    assert [r.writes for r in r5] == [False] * 4 + [True] and r5[0].encodes and not any(r.encodes for r in r5[1:])
    assert [r.steps for r in assign_roles(3)] == [(0, 1), (2,), (3,)]
    assert [r.steps for r in assign_roles(2)] == [(0, 1), (2, 3)] and assign_roles(2)[1].writes
    p = Pipeline.of(4)
    assert (p.writer, p.upstream(0), p.upstream(2), p.downstream(0), p.downstream(3)) == (3, None, 1, 1, None)
    assert Pipeline.of(5).upstream(4) == 3 and Pipeline.of(5).downstream(3) == 4
    with pytest.raises(LowvramError, match="at most 5 GPUs"):
        assign_roles(6)


@pytest.mark.parametrize("gpus", [1, 4, 5])
def test_every_process_count_writes_the_sequential_frames(tiny_ckpt, inputs, tmp_path, sequential, gpus):
    res = launch(_opts(tiny_ckpt, inputs, tmp_path / f"p{gpus}.mp4"), gpus, log=lambda *a: None)
    assert res.frames == 45 and res.blocks == 4 and not res.interrupted and res.gpus == gpus
    assert np.array_equal(_frames(tmp_path / f"p{gpus}.mp4"), sequential)
    assert not list(tmp_path.glob("*.partial*"))  # renamed into place, as the single-process run
    ranks = {r["rank"]: r for r in res.ranks}
    assert sorted(ranks) == list(range(gpus))
    assert sum(r["forwards"] for r in ranks.values()) == 4 * 4  # every (block, step) once, on its owner
    if gpus > 1:  # one message per block on every link: latents (+ audio while a DiT rank needs it)
        assert all(ranks[r]["messages_sent"] == 4 for r in range(gpus - 1))
        assert ranks[gpus - 1]["bytes_sent"] == 0
    if gpus == 5:  # to the VAE rank only the latents: the audio stays with the DiT ranks
        assert ranks[0]["bytes_per_block"] > ranks[3]["bytes_per_block"] > 0


def test_cli_gpus_2_writes_the_sequential_frames(tiny_ckpt, inputs, tmp_path, sequential):
    ckpt, lora = tiny_ckpt
    out = tmp_path / "cli.mp4"
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image",
                                 str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--prompt",
                                 "a person talking", "--size", "64*64", "--num-clip", "1", "--seed", "11",
                                 "--out", str(out), "--device", "cpu", "--gpus", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "45 frames" in r.output
    assert np.array_equal(_frames(out), sequential)


def test_under_torchrun_2_writes_the_sequential_frames(tiny_ckpt, inputs, tmp_path, sequential):
    """The same command under torchrun: its ranks join through torchrun's environment (no own launcher)."""
    import subprocess
    import sys

    import socket

    ckpt, lora = tiny_ckpt
    out = tmp_path / "torchrun.mp4"
    with socket.socket() as sock:  # a free port for torchrun's rendezvous (its port 0 is not "any")
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "lowvram.cli.main", "run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image",
           str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--prompt", "a person talking",
           "--size", "64*64", "--num-clip", "1", "--seed", "11", "--out", str(out), "--device", "cpu",
           "--gpus", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("wrote ") == 1  # only the writer rank prints the result
    assert np.array_equal(_frames(out), sequential)


def test_a_rank_killed_mid_run_stops_the_others_with_one_line(tiny_ckpt, inputs, tmp_path):
    opts = _opts(tiny_ckpt, inputs, tmp_path / "k.mp4")
    killed = {}

    def on_block(ev):
        if ev.blocks_done == 1 and not killed:
            os.kill(launcher.pids[1], signal.SIGKILL)
            killed.update(t=time.monotonic(), path=ev.path)

    launcher = Launcher(opts, 3, log=lambda *a: None, on_block=on_block)
    with pytest.raises(RankFailure) as e:
        launcher.run()
    waited = time.monotonic() - killed["t"]
    msg = str(e.value)
    assert "\n" not in msg and "rank 1" in msg and "SIGKILL" in msg, msg
    assert waited < 10, f"the others took {waited:.1f} s to stop"
    assert all(p.poll() is not None for p in launcher.procs)
    n = int(re.search(r"keeps the (\d+) frames", msg).group(1))
    assert n >= 9 and (n + 3) % 12 == 0  # whole blocks only (the first loses 3 frames)
    assert _frames(killed["path"]).shape[0] == n and not (tmp_path / "k.mp4").exists()


def test_a_rank_that_raises_is_one_line_naming_it(tiny_ckpt, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_TPP_FAULT", "1:2")  # rank 1 raises at block 2
    ckpt, lora = tiny_ckpt
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image",
                                 str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--prompt", "x",
                                 "--size", "64*64", "--num-clip", "1", "--out", str(tmp_path / "f.mp4"),
                                 "--device", "cpu", "--gpus", "2", "--quiet"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1") and "injected fault" in lines[0], r.output
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("args, needle", [(["--device", "cpu", "--gpus", "6"], "at most 5 GPUs"),
                                          (["--device", "cuda", "--gpus", "2"], "GPU")])
def test_too_many_gpus_is_one_line_exit_2_before_any_process(tiny_ckpt, inputs, tmp_path, args, needle):
    if "cuda" in args and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    ckpt, lora = tiny_ckpt
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image",
                                 str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--prompt", "x",
                                 "--out", str(tmp_path / "g.mp4"), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    assert not list(Path(tmp_path).glob("*.mp4*"))


def test_sigterm_stops_every_rank_at_a_block_boundary_and_the_file_plays(tiny_ckpt, inputs, tmp_path):
    out = tmp_path / "s.mp4"

    def on_block(ev):
        if ev.blocks_done == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's handler: every rank stops at its next block

    res = launch(_opts(tiny_ckpt, inputs, out), 4, log=lambda *a: None, on_block=on_block)
    assert res.interrupted and res.stop_signal == signal.SIGTERM and 1 <= res.blocks < 4
    assert _frames(out).shape[0] == res.frames == 12 * res.blocks - 3


def test_online_decode_on_three_ranks_refreshes_the_sink_as_the_sequential_run(tiny_ckpt, inputs, tmp_path,
                                                                             one_thread):
    synth_voice(str(tmp_path / "long.wav"), seconds=3.5, seed=4)
    opts = dict(audio=tmp_path / "long.wav", num_clip=2, online_decode=True)
    seq = run(_opts(tiny_ckpt, inputs, tmp_path / "seq.mp4", **opts), log=lambda *a: None)
    res = launch(_opts(tiny_ckpt, inputs, tmp_path / "p3.mp4", **opts), 3, log=lambda *a: None)
    assert res.frames == seq.frames == 93 and res.clips == 2
    assert [r["steps"] for r in res.ranks] == [[0, 1], [2], [3]]
    assert np.array_equal(_frames(tmp_path / "p3.mp4"), _frames(seq.out))


def test_a_rank_whose_card_is_too_small_is_one_line_exit_2_before_weights_load(tiny_ckpt, inputs, tmp_path):
    ckpt, lora = tiny_ckpt
    r = CliRunner().invoke(cli, ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image",
                                 str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--prompt", "x",
                                 "--size", "64*64", "--out", str(tmp_path / "t.mp4"), "--device", "cpu", "--gpus", "2",
                                 "--profile", "12gb", "--set", "quant=bf16", "--set", "vram_budget_gib=0.05", "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0") and "budget" in lines[0], r.output
    assert not list(tmp_path.glob("*.mp4*"))


def test_plan_gpus_says_which_rank_does_what(tiny_ckpt):
    ckpt, _ = tiny_ckpt
    r = CliRunner().invoke(cli, ["plan", "--ckpt-dir", str(ckpt), "--size", "64*64", "--device", "cpu", "--gpus", "5"])
    assert r.exit_code == 0, r.output
    ranks = [ln for ln in r.output.splitlines() if ln.startswith("rank ")]
    assert len(ranks) == 5 and "step 0" in ranks[0] and "encoders" in ranks[0] and "step 3" in ranks[3]
    assert "VAE decode + mp4 writer" in ranks[4] and "expected peak" in r.output
    r = CliRunner().invoke(cli, ["plan", "--ckpt-dir", str(ckpt), "--size", "64*64", "--device", "cpu", "--gpus", "2",
                                 "--json"])
    d = __import__("json").loads(r.output)
    assert [x["steps"] for x in d["ranks"]] == [[0, 1], [2, 3]] and d["ranks"][1]["writes"]
    assert d["ranks"][0]["plan"]["steps"] == [0, 1]  # each rank's plan holds only its own step caches
