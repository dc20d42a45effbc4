"""The web page's parts without a browser: the persistent store (restart, a job that was running, the
lock), the worker (order, cancel of a queued and of a running job, failures), the preview reader on a
growing fragmented mp4, upload checks and the page's handlers."""

import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.errors import LowvramError
from lowvram.jobs import view
from lowvram.jobs.model import Job
from lowvram.jobs.preview import FragmentReader, decode_frames
from lowvram.jobs.store import JobStore
from lowvram.jobs.worker import Worker
from lowvram.pipeline.options import RunResult

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    synth_portrait(str(d / "face.png"), width=96, height=96, seed=5)
    synth_voice(str(d / "voice.wav"), seconds=1.0, seed=5)
    synth_voice(str(d / "short.wav"), seconds=0.2, seed=5)
    with wave.open(str(d / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    (d / "not_an_image.png").write_text("hello")
    (d / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    return d


SETTINGS = {"prompt": "p", "size": "64*64", "seed": 1, "steps": 4, "num_clip": 1, "profile": None, "overrides": []}


def _add(store, media, **kw):
    return store.add({**SETTINGS, **kw}, {"image": media / "face.png", "audio": media / "voice.wav"})


def test_store_survives_a_restart_and_marks_a_running_job_interrupted(media, tmp_path):
    from lowvram.io.video_writer import VideoWriter

    s = JobStore(tmp_path / "jobs", log=lambda *a: None)
    a, b, c, d = (_add(s, media, prompt=p) for p in "abcd")
    s.update(a.id, status="done", video="video.mp4")
    s.update(b.id, status="running", video="video.partial.mp4")           # died before its first block
    s.update(d.id, status="running", video="video.partial.mp4")           # died after two blocks
    with VideoWriter(str(s.folder(d.id) / "video.partial.mp4"), 64, 64) as w:
        w.write(torch.zeros(3, 24, 64, 64))
    with pytest.raises(LowvramError, match="another lowvram ui"):
        JobStore(tmp_path / "jobs")                   # one server per jobs directory
    s.close()
    (tmp_path / "jobs" / "junk").mkdir()
    (tmp_path / "jobs" / "junk" / "job.json").write_text("{not json")
    logs = []
    s2 = JobStore(tmp_path / "jobs", log=logs.append)
    assert [j.id for j in s2.all()] == [a.id, b.id, c.id, d.id]
    assert [j.status for j in s2.all()] == ["done", "interrupted", "queued", "interrupted"]
    assert "server stopped" in s2.get(b.id).error and s2.next_queued().id == c.id
    assert s2.get(b.id).video is None and s2.get(d.id).thumb == "thumb.png"     # the gallery shows what d kept
    assert [j.id for j in view.gallery_jobs(s2.all())] == [d.id] and b.id in [r[0] for r in view.queue_rows(s2.all())]
    assert (s2.folder(c.id) / "portrait.png").read_bytes() == (media / "face.png").read_bytes()
    assert any("unreadable" in m for m in logs)
    s2.close()


class SlowRunner:
    """Writes a real fragmented mp4, one block per `step` seconds, honouring should_stop; records calls."""

    def __init__(self, blocks=4, step=0.05):
        self.blocks, self.step, self.calls = blocks, step, []
        self.release = threading.Event()
        self.release.set()

    def run(self, opts, progress=None, on_block=None, should_stop=None):
        from lowvram.io.video_writer import VideoWriter
        from lowvram.jobs.runner import BlockEvent

        self.calls.append(opts.prompt)
        if opts.prompt == "fail":
            raise RuntimeError("out of memory (fake)")
        progress.start(total_blocks=self.blocks, clips=1, headline="64x64 fake")
        done = 0
        with VideoWriter(str(opts.out), 64, 64) as w:
            for b in range(self.blocks):
                self.release.wait(10)
                w.write(torch.full((3, 12, 64, 64), b / self.blocks))
                done += 1
                on_block(BlockEvent(0, b, done, self.blocks, 12 * done, 0.1 * done, 0, Path(opts.out)))
                time.sleep(self.step)
                if should_stop():
                    break
        return RunResult(Path(opts.out), 12 * done, 1, done, 0.1 * done, interrupted=done < self.blocks)

    def close(self):
        pass


def _wait(cond, timeout=30):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.02)


def test_worker_runs_in_order_cancels_queued_and_running_jobs_and_survives_a_failure(media, tmp_path):
    s = JobStore(tmp_path / "jobs", log=lambda *a: None)
    r = SlowRunner(blocks=4)
    r.release.clear()                                    # the first job waits inside its first block
    w = Worker(s, r, {"ckpt_dir": "ck", "device": "cpu"}, log=lambda *a: None).start()
    first, fail, dropped, last = (_add(s, media, prompt=p) for p in ("first", "fail", "dropped", "last"))
    w.wake()
    _wait(lambda: s.get(first.id).status == "running")
    assert s.get(dropped.id).status == "queued"
    assert "removed" in w.cancel(dropped.id) and s.get(dropped.id).status == "cancelled"
    r.release.set()
    _wait(lambda: s.get(first.id).progress.get("blocks_done", 0) >= 1)
    assert "stopping" in w.cancel(first.id)
    _wait(lambda: s.get(first.id).status == "interrupted")
    j = s.get(first.id)
    assert j.video == "video.partial.mp4" and j.thumb == "thumb.png" and "cancelled after" in j.error
    assert 12 <= len(decode_frames((s.folder(j.id) / j.video).read_bytes())) < 48   # playable, partial
    _wait(lambda: s.get(last.id).status == "done")
    assert s.get(fail.id).status == "failed" and "RuntimeError: out of memory" in s.get(fail.id).error
    assert r.calls == ["first", "fail", "last"]          # submission order; the cancelled one never ran
    done = s.get(last.id)
    assert done.video == "video.mp4" and done.result["frames"] == 48 and done.preview.startswith("preview/")
    assert (s.folder(done.id) / "video.json").is_file() and done.headline == "64x64 fake"
    w.shutdown()
    s.close()


def test_fragment_reader_returns_each_block_once_while_the_file_grows(tmp_path):
    from lowvram.io.video_writer import VideoWriter

    path, seen = tmp_path / "g.mp4", []
    with VideoWriter(str(path), 64, 64, audio=np.random.default_rng(1).standard_normal(48000).astype(np.float32)) as w:
        reader = FragmentReader(w.partial_path)           # the writer fills the partial file, renamed at close
        assert reader.read_new() is None                  # nothing complete yet
        for b in range(4):
            w.write(torch.full((3, 12, 64, 64), -0.9 + 0.5 * b))
            data = reader.read_new()
            seen.append(decode_frames(data) if data else [])
    assert path.exists() and not w.partial_path.exists()
    reader.path = path                                    # same bytes under the final name: keep the offset
    tail = reader.read_new()
    seen.append(decode_frames(tail) if tail else [])
    counts = [len(f) for f in seen]
    assert sum(counts) == 48 and counts[0] == 0 and all(c in (0, 12) for c in counts)  # a block, once
    means = [float(np.mean(f[0])) for f in seen if f]
    assert means == sorted(means)                         # block 0, 1, 2, 3 in order (brighter each)


@pytest.mark.parametrize("name,needle", [("not_an_image.png", "Pillow cannot open it"), ("silent.wav", "silent"),
                                         ("short.wav", "at least 0.48 s"), ("noise.wav", "cannot decode")])
def test_bad_upload_is_one_line_naming_the_file_as_uploaded(media, tmp_path, name, needle):
    from lowvram.jobs.uploads import check_portrait, check_voice

    tmp = tmp_path / "gradio-cache-x" / name            # where Gradio would keep it
    tmp.parent.mkdir()
    tmp.write_bytes((media / name).read_bytes())
    payload = {"path": str(tmp), "orig_name": name}
    check = check_portrait if name.endswith(".png") else check_voice
    with pytest.raises(LowvramError) as e:
        check(payload)
    msg = str(e.value)
    assert needle in msg and name in msg and "gradio-cache-x" not in msg and "\n" not in msg


def test_upload_size_limit(media):
    from lowvram.jobs.uploads import check_portrait

    with pytest.raises(LowvramError, match="up to 0 MB"):
        check_portrait({"path": str(media / "face.png"), "orig_name": "face.png"}, limit_mb=0.001)


def test_page_handlers_submit_validate_and_rerun(media, tiny_ckpt, tmp_path):
    from lowvram.jobs.app import CLIPS, WHOLE, App

    s = JobStore(tmp_path / "jobs", log=lambda *a: None)

    class NoWorker:
        current = None

        def wake(self):
            pass

    app = App(s, NoWorker(), {"ckpt_dir": str(tiny_ckpt[0])}, size="64*64")  # the headline plans on it
    img, voice = {"path": str(media / "face.png"), "orig_name": "me.png"}, {"path": str(media / "voice.wav")}
    msg, jid = app.submit(img, voice, "a person", "none", "64*64", 7, CLIPS, 2, "", 4)
    assert "queued" in msg and s.get(jid).settings == {**SETTINGS, "prompt": "a person", "seed": 7, "num_clip": 2,
                                                        "image": "portrait.png", "audio": "voice.wav"}
    for bad, needle in [(dict(prompt=" "), "no prompt"), (dict(portrait=None), "no portrait"),
                        (dict(voice={"path": str(media / "silent.wav"), "orig_name": "quiet.wav"}), "quiet.wav is silent"),
                        (dict(overrides="kv_dtype=bf16"), "need a profile"),
                        (dict(profile="4090", overrides="gemm=fastest"), "gemm"), (dict(size="big"), "--size"),
                        (dict(seed="x"), "seed must be a whole number")]:
        args = {"portrait": img, "voice": voice, "prompt": "p", "profile": "none", "size": "64*64", "seed": 1,
                "length": WHOLE, "clips": 1, "overrides": "", "steps": 4, **bad}
        msg, jid2 = app.submit(*args.values())
        assert needle in msg and "lv-err" in msg and jid2 == "", (bad, msg)
    assert len(s.all()) == 1
    msg, again = app.rerun(jid)
    assert "re-run" in msg and s.get(again).settings == s.get(jid).settings and s.get(again).rerun_of == jid
    assert "Plan:" in app.headline("none", "64*64", "", img) and "64x64" in app.headline("none", "64*64", "", img)
    assert "cannot plan" in app.headline("4090", "64*64", "", img)      # no config.json in "ck": one line, no trace
    checked, image_value, voice_value = app.check_uploads(
        {"path": str(media / "not_an_image.png"), "orig_name": "cat.txt.png"}, voice, "64*64")
    assert "cat.txt.png" in checked and "voice.wav is usable" in checked
    assert image_value is None and voice_value is not None          # the bad upload is cleared, the good one kept
    s.close()


def test_view_eta_queue_rows_and_gallery():
    jobs = [Job("a", {"prompt": "x"}, status="done", video="video.mp4", thumb="thumb.png", result={"frames": 45, "seconds": 2.0}),
            Job("b", {"prompt": "y"}, status="failed", error="bad image"),
            Job("c", {"prompt": "z"}, status="running", progress={"blocks_done": 2, "blocks_total": 8, "seconds": 4.0,
                                                                   "frames": 21}),
            Job("d", {"prompt": "w"}, status="queued")]
    assert view.eta_seconds(jobs[2].progress) == pytest.approx(12.0)
    assert [r[0] for r in view.queue_rows(jobs)] == ["c", "d", "b"]
    assert [j.id for j in view.gallery_jobs(jobs)] == ["a"]
    html = view.status_html(jobs[2], 1, on_cuda=False)
    assert "block 2/8" in html and "ETA 0:12" in html and "1 more waiting" in html and "CPU" in html
    assert "VRAM" in view.status_html(jobs[2], 0, on_cuda=True)


def test_ui_command_checks_auth_and_host_before_serving():
    from click.testing import CliRunner

    from lowvram.cli.main import cli
    from lowvram.cli.ui import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.2") and not _loopback("example.org")
    res = CliRunner().invoke(cli, ["ui", "--auth", "nopassword"])
    assert res.exit_code == 2 and res.output.strip() == "error: --auth must be USER:PASSWORD (both non-empty)"
    res = CliRunner().invoke(cli, ["ui", "--host", "0.0.0.0", "--size", "huge"])
    assert res.exit_code == 2 and "warning: --host 0.0.0.0" in res.output and "--auth" in res.output
