"""What a person sees from `lowvram run` when things go wrong or are cut short: one line and exit 2 for a bad
argument (nothing written, no input overwritten), each phase shown from the first second, one plain line per
block when stderr is not a terminal, and Ctrl-C / SIGTERM ending with exit 130 / 143 and a last line that says
how much of the video is in the (complete, playable) file."""

import os
import signal
import subprocess
import sys
import time

import av
import pytest
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    synth_portrait(str(d / "face.png"), width=128, height=128, seed=4)
    synth_voice(str(d / "voice.wav"), seconds=4.0, seed=4)
    return d


def _argv(tiny_ckpt, media, out, *extra):
    ckpt, lora = tiny_ckpt
    return ["run", "--ckpt-dir", str(ckpt), "--lora", str(lora), "--image", str(media / "face.png"),
            "--audio", str(media / "voice.wav"), "--prompt", "p", "--size", "128*128", "--device", "cpu",
            "--out", str(out), *extra]


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "9"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--num-clip", "0"], "--num-clip"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "cuda"),
    (["--lora-alpha", "nan"], "alpha"),
    (["--lora-alpha", "-2"], "alpha"),
    (["--set", "blocks_resident=many"], "blocks_resident"),
])
def test_a_bad_argument_is_one_line_exit_2(tiny_ckpt, media, tmp_path, extra, needle):
    r = CliRunner().invoke(cli, _argv(tiny_ckpt, media, tmp_path / "o.mp4", "--quiet", *extra))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_an_output_that_names_an_input_is_refused_and_the_input_survives(tiny_ckpt, media, tmp_path, flag):
    voice = tmp_path / "voice.wav"
    voice.write_bytes((media / "voice.wav").read_bytes())
    before = voice.read_bytes()
    argv = _argv(tiny_ckpt, media, tmp_path / "o.mp4", "--quiet")
    argv[argv.index("--audio") + 1] = str(voice)
    if flag == "--out":
        argv[argv.index("--out") + 1] = str(voice.with_suffix(".mp4"))
        voice.with_suffix(".mp4").symlink_to(voice)  # the same file under another name
    else:
        argv += ["--report", str(voice)]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and flag in r.output, r.output
    assert voice.read_bytes() == before


def test_the_demo_refuses_a_bad_length(tmp_path):
    for bad in ("0", "nan", "1e9"):
        r = CliRunner().invoke(cli, ["demo", "--seconds", bad, "--out", str(tmp_path / "d.mp4"), "--quiet"])
        assert r.exit_code == 2 and "--seconds" in r.output, (bad, r.output)
    assert not (tmp_path / "d.mp4").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_what_it_kept_and_exits_with_the_signal_status(tiny_ckpt, media, tmp_path, sig, code):
    """As a user in a terminal pipe sees it: phase lines at once, a plain line per block, then the signal."""
    out = tmp_path / "s.mp4"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lowvram.cli.main", *_argv(tiny_ckpt, media, out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines, t0 = [], time.monotonic()
    for line in p.stderr:  # stderr is a pipe here: no rich bar, one plain line per block
        lines.append(line.rstrip())
        if line.startswith("block 2/"):
            p.send_signal(sig)
            break
        assert time.monotonic() - t0 < 600, lines
    rest_err, rest_out = p.stderr.read(), p.stdout.read()
    assert p.wait(timeout=300) == code, (lines, rest_err, rest_out)
    assert lines[0].endswith("...") and any(ln.startswith("prompt embedding (umT5)") for ln in lines)
    assert any(ln.startswith("placing the DiT: ") and ln.endswith(" s") for ln in lines)
    assert rest_out.startswith("interrupted: ") and "complete and playable" in rest_out
    with av.open(str(out)) as c:  # renamed into place, whole blocks only
        frames = sum(1 for _ in c.decode(video=0))
    assert frames in (2 * 12 - 3, 3 * 12 - 3) and f"first {frames} frames" in rest_out
