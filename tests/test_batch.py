"""`lowvram batch`: jobs files (TOML/CSV/JSONL, defaults, relative paths, one-line errors), the order that
maximizes reuse, the partial-name + rename + sidecar rule, and on the tiny checkpoint: continue after a
failure, skip complete outputs on a rerun, exit codes, Ctrl-C (SIGINT to a subprocess) leaving a
playable partial file that the next run redoes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from click.testing import CliRunner

from lowvram.cli.main import cli
from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.errors import LowvramError
from lowvram.jobs import sidecar
from lowvram.jobs.batch import exit_code, order_for_reuse, run_batch
from lowvram.jobs.execute import execute
from lowvram.jobs.jobfile import read_jobs
from lowvram.pipeline.options import RunOptions, RunResult


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    synth_portrait(str(d / "face.png"), width=96, height=96, seed=3)
    synth_portrait(str(d / "wide.png"), width=192, height=96, seed=4)
    synth_voice(str(d / "voice.wav"), seconds=2.0, seed=3)
    (d / "not_an_image.png").write_text("hello")
    return d


def _frames(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


# ---- jobs files

def test_toml_csv_jsonl_give_the_same_jobs_with_defaults_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "jobs.toml").write_text(
        '[[job]]\nimage = "a.png"\naudio = "sub/a.wav"\nprompt = "hi"\nseed = 7\nset = ["kv_dtype=bf16"]\n'
        '[[job]]\nimage = "/abs/b.png"\naudio = "b.wav"\nprompt = "ho"\nnum-clip = 2\nout = "b.mp4"\n')
    (tmp_path / "jobs.csv").write_text(
        "image,audio,prompt,seed,set,num_clip,out\na.png,sub/a.wav,hi,7,kv_dtype=bf16,,\n"
        "/abs/b.png,b.wav,ho,,,2,b.mp4\n")
    (tmp_path / "jobs.jsonl").write_text(
        json.dumps({"image": "a.png", "audio": "sub/a.wav", "prompt": "hi", "seed": 7, "set": "kv_dtype=bf16"}) + "\n\n"
        + json.dumps({"image": "/abs/b.png", "audio": "b.wav", "prompt": "ho", "num_clip": "2", "out": "b.mp4"}) + "\n")
    defaults = {"seed": 1, "size": "64*64", "ckpt_dir": Path("ck"), "set": ("gemm=reference",)}
    got = {}
    for ext in ("toml", "csv", "jsonl"):
        jobs = read_jobs(tmp_path / f"jobs.{ext}", defaults=defaults)
        got[ext] = [(j.image, j.audio, j.prompt, j.seed, j.size, j.num_clip, j.overrides, j.out, j.ckpt_dir)
                    for j in jobs]
    assert got["toml"] == got["jsonl"]
    # jsonl's blank line 2 keeps row numbers: its second job is row 3 in default names; here both have out
    assert got["toml"] == got["csv"]
    a, b = got["toml"]
    base = tmp_path.resolve()
    assert a == (base / "a.png", base / "sub/a.wav", "hi", 7, "64*64", None, ("kv_dtype=bf16",), base / "jobs-1.mp4",
                 Path("ck"))
    assert b[0] == Path("/abs/b.png") and b[3] == 1 and b[5] == 2 and b[6] == ("gemm=reference",)
    assert b[7] == base / "b.mp4"


def test_profile_none_in_a_row_overrides_the_command_line_profile(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"image": "a.png", "audio": "a.wav", "prompt": "x", "profile": "none"}\n'
                                      '{"image": "a.png", "audio": "a.wav", "prompt": "x", "out": "b.mp4"}\n')
    jobs = read_jobs(tmp_path / "j.jsonl", defaults={"ckpt_dir": Path("ck"), "profile": "4090"})
    assert [j.profile for j in jobs] == [None, "4090"]


BAD = [
    ("jobs.yaml", "image: a\n", "must end in .toml, .csv, .jsonl"),
    ("jobs.csv", "image,audio,prompt,sede\na.png,a.wav,x,1\n", "row 1: 'sede' is not a lowvram run option"),
    ("jobs.csv", "image,audio,prompt,seed\na.png,a.wav,x,1\na.png,a.wav,x,one\n", "row 2: seed='one' is not an integer"),
    ("jobs.csv", "image,audio,prompt\na.png,a.wav,x,extra\n", "row 1: more cells"),
    ("jobs.jsonl", '{"image": "a.png", "audio": "a.wav", "prompt": "x"}\n{"image": "a.png",\n', "row 2: not valid JSON"),
    ("jobs.jsonl", '{"audio": "a.wav", "prompt": "x"}\n', "row 1: image is missing"),
    ("jobs.toml", '[[job]]\nimage="a.png"\naudio="a.wav"\nprompt="x"\nonline_decode="maybe"\n',
     "row 1: online_decode='maybe' is not true or false"),
    ("jobs.toml", '[[job]]\nimage="a.png"\naudio="a.wav"\nprompt="x"\nout="o.mp4"\n'
                  '[[job]]\nimage="b.png"\naudio="b.wav"\nprompt="y"\nout="o.mp4"\n', "row 2: out"),
    ("jobs.toml", "[[job]\n", "not valid TOML"),
    ("jobs.toml", "", "no jobs"),
]


@pytest.mark.parametrize("name,text,needle", BAD, ids=[n for _, _, n in BAD])
def test_bad_jobs_file_is_one_line_naming_the_row_and_key(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(LowvramError) as e:
        read_jobs(tmp_path / name, defaults={"ckpt_dir": Path("ck")})
    assert needle in str(e.value) and "\n" not in str(e.value)
    res = CliRunner().invoke(cli, ["batch", str(tmp_path / name)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("error:"), res.output


def test_order_groups_by_load_key_then_plan_key_keeping_file_order(media):
    def job(i, **kw):
        return RunOptions(ckpt_dir=Path(kw.pop("ckpt", "A")), image=media / kw.pop("img", "face.png"),
                          audio=media / "voice.wav", prompt=str(i), out=Path(f"{i}.mp4"), **kw)

    jobs = [job(0), job(1, ckpt="B"), job(2, profile="4090"), job(3), job(4, img="wide.png"),
            job(5, ckpt="B"), job(6, profile="4090"), job(7, size="64*64")]
    order = order_for_reuse(jobs)
    # checkpoint A first (first seen), its plan groups in first-seen order; then checkpoint B
    assert order == [0, 3, 2, 6, 4, 7, 1, 5]


# ---- the rule: partial name, rename when complete, sidecar

class FakeRunner:
    """Writes a real fragmented mp4 block by block (VideoWriter) as a run would; fails on 'bad' images;
    records what the sidecar said while it ran."""

    def __init__(self, blocks=4):
        self.blocks, self.calls, self.during = blocks, [], []

    def run(self, opts, progress=None, on_block=None, should_stop=None):
        import torch

        from lowvram.io.video_writer import VideoWriter

        self.calls.append(opts)
        final = Path(str(opts.out).replace(".partial", ""))
        self.during.append((sidecar.read_json(sidecar.sidecar_path(final))["status"], final.exists()))
        if "bad" in str(opts.image):
            raise LowvramError(f"cannot read image {opts.image}")
        if progress is not None:
            progress.start(total_blocks=self.blocks, clips=1, headline="fake headline")
        done = 0
        with VideoWriter(str(opts.out), 64, 64) as w:
            for b in range(self.blocks):
                w.write(torch.zeros(3, 12, 64, 64))
                done += 1
                if should_stop is not None and should_stop():
                    break
        return RunResult(Path(opts.out), 12 * done, 1, done, 0.5, interrupted=done < self.blocks)


def _job(media, tmp_path, name, image="face.png", **kw):
    return RunOptions(ckpt_dir=Path("ck"), image=media / image, audio=media / "voice.wav", prompt="p",
                      out=tmp_path / name, **kw)


def test_execute_renames_only_when_complete_and_the_sidecar_follows(media, tmp_path):
    r = FakeRunner()
    oc = execute(r, _job(media, tmp_path, "a.mp4"))
    assert r.calls[0].out == tmp_path / "a.partial.mp4"
    assert r.during == [("running", False)]                 # while it ran: sidecar running, no final file
    side = sidecar.read_json(tmp_path / "a.json")
    assert oc.status == "done" and side["status"] == "done" and side["file"] == "a.mp4"
    assert side["bytes"] == (tmp_path / "a.mp4").stat().st_size and not (tmp_path / "a.partial.mp4").exists()
    assert side["headline"] == "fake headline" and side["seed"] == 420 and len(side["inputs"]["image"]["sha256"]) == 64
    assert sidecar.is_complete(_job(media, tmp_path, "a.mp4")) == (True, "")
    assert not sidecar.is_complete(_job(media, tmp_path, "a.mp4", seed=1))[0]            # other settings
    stopped = execute(FakeRunner(), _job(media, tmp_path, "b.mp4"), should_stop=lambda: True)
    assert stopped.status == "interrupted" and stopped.file == tmp_path / "b.partial.mp4"
    assert _frames(stopped.file) == 12 and not (tmp_path / "b.mp4").exists()
    assert sidecar.read_json(tmp_path / "b.json")["status"] == "interrupted"
    assert sidecar.is_complete(_job(media, tmp_path, "b.mp4")) == (False, "last run interrupted")
    with open(tmp_path / "a.mp4", "ab") as f:
        f.write(b"x")
    assert sidecar.is_complete(_job(media, tmp_path, "a.mp4")) == (False, "output missing or changed")


def test_batch_loop_skips_complete_redoes_interrupted_goes_on_after_failure(media, tmp_path):
    jobs = [_job(media, tmp_path, "1.mp4"), _job(media, tmp_path, "2.mp4", image="bad.png"),
            _job(media, tmp_path, "3.mp4")]
    execute(FakeRunner(), jobs[2], should_stop=lambda: True)        # an earlier interrupted run of job 3
    r, logs = FakeRunner(), []
    rows = run_batch(jobs, r, log=logs.append)
    assert [x.status for x in rows] == ["done", "failed", "done"] and exit_code(rows) == 1
    assert "cannot read image" in rows[1].note and any("failed: cannot read image" in m for m in logs)
    assert len(r.calls) == 3
    r2 = FakeRunner()
    rows = run_batch(jobs, r2, log=logs.append)
    assert [x.status for x in rows] == ["skipped", "failed", "skipped"] and len(r2.calls) == 1
    rows = run_batch(jobs[:1] + jobs[2:], FakeRunner())
    assert exit_code(rows) == 0
    stop = iter([False, True])
    rows = run_batch([_job(media, tmp_path, "4.mp4"), _job(media, tmp_path, "5.mp4")], FakeRunner(),
                     should_stop=lambda: next(stop, True))
    assert [x.status for x in rows] == ["interrupted", "not run"] and exit_code(rows) == 130


# ---- on the tiny checkpoint, through the command line

def _base_args(tiny_ckpt):
    ckpt, lora = tiny_ckpt
    return ["--ckpt-dir", str(ckpt), "--lora", str(lora), "--device", "cpu", "--size", "64*64", "--quiet"]


@pytest.mark.slow
def test_cli_batch_goes_on_after_a_failure_and_a_rerun_skips_the_complete_output(tiny_ckpt, media, tmp_path):
    (tmp_path / "in").mkdir()
    for n in ("face.png", "voice.wav", "not_an_image.png"):
        (tmp_path / "in" / n).write_bytes((media / n).read_bytes())
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,audio,prompt,num_clip,seed,out\n"
                    "in/not_an_image.png,in/voice.wav,a person,1,2,out/bad.mp4\n"
                    "in/face.png,in/voice.wav,a person,1,1,out/good.mp4\n")
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(cli, ["batch", str(jobs), *_base_args(tiny_ckpt)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    fail = [i for i, l in enumerate(lines) if "failed: cannot read image" in l and "not_an_image.png" in l]
    gen = [i for i, l in enumerate(lines) if "good.mp4: no sidecar, generating" in l]
    assert fail and gen and fail[0] < gen[0], res.output          # the failure is logged, then the batch goes on
    assert _frames(tmp_path / "out" / "good.mp4") == 45
    side = sidecar.read_json(tmp_path / "out" / "good.json")
    assert side["status"] == "done" and side["seed"] == 1 and side["result"]["frames"] == 45 and side["headline"]
    assert sidecar.read_json(tmp_path / "out" / "bad.json")["status"] == "failed"
    assert not list((tmp_path / "out").glob("*.partial.mp4")) and not (tmp_path / "out" / "bad.mp4").exists()
    assert "lowvram batch" in res.output and "good.mp4" in res.output.split("lowvram batch")[-1]  # the summary
    before = (tmp_path / "out" / "good.mp4").stat().st_mtime_ns
    again = CliRunner().invoke(cli, ["batch", str(jobs), *_base_args(tiny_ckpt)])
    assert again.exit_code == 1 and "good.mp4: complete, skipped" in again.output, again.output
    assert (tmp_path / "out" / "good.mp4").stat().st_mtime_ns == before


@pytest.mark.slow
def test_sigint_stops_at_a_block_boundary_keeps_a_playable_partial_and_the_rerun_redoes_it(tiny_ckpt, media,
                                                                                          tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    rows = [{"image": str(media / "face.png"), "audio": str(media / "voice.wav"), "prompt": "a person",
             "out": "first.mp4"},
            {"image": str(media / "not_an_image.png"), "audio": str(media / "voice.wav"), "prompt": "a person",
             "out": "second.mp4"}]
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    part = tmp_path / "first.partial.mp4"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowvram.cli.main", "batch", str(jobs), *_base_args(tiny_ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and b"moof" in part.read_bytes():   # a block is on disk: generation is under way
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    n = _frames(part)
    assert 0 < n < 93 and (n + 3) % 12 == 0, n                     # whole blocks only (the first drops 3)
    assert sidecar.read_json(tmp_path / "first.json")["status"] == "interrupted"
    assert not (tmp_path / "first.mp4").exists() and not (tmp_path / "second.json").exists()
    assert "interrupted" in out and "not run" in out
    res = CliRunner().invoke(cli, ["batch", str(jobs), *_base_args(tiny_ckpt)])
    assert res.exit_code == 1 and "first.mp4: last run interrupted, generating" in res.output, res.output
    assert _frames(tmp_path / "first.mp4") == 93 and not part.exists()
    assert sidecar.read_json(tmp_path / "first.json")["status"] == "done"
