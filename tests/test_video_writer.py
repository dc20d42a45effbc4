"""The video file under faults: temporary name + rename, the lock beside the output, write errors."""

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest

from lowvram.errors import LowvramError
from lowvram.io import video_writer
from lowvram.io.locks import lock_output, lock_path
from lowvram.io.mp4frag import complete_end, count_frames
from lowvram.io.partials import find_partials, partial_path_for, partials_note
from lowvram.io.video_writer import VideoWriteError, VideoWriter

H, W, BLOCK = 64, 96, 12


def _blocks(n, seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (BLOCK, h, w, 3), dtype=np.uint8) for _ in range(n)]


def _frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _boxes(path):
    data, pos, out = open(path, "rb").read(), 0, []
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind.decode(), pos, pos + size))
        pos += size
    return out


def _audio(seconds=10.0):
    return (0.3 * np.sin(np.arange(int(16000 * seconds)) * 0.1)).astype(np.float32)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- the rename rule

def test_close_renames_into_place_and_replaces_an_old_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"an older video")
    with VideoWriter(path, W, H, audio=_audio()) as w:
        assert w.partial_path == partial_path_for(path) and w.partial_path.parent == tmp_path
        assert w.partial_path.name.startswith(".out.partial-")
        for b in _blocks(2):
            w.write(b)
            assert path.read_bytes() == b"an older video"  # untouched until the end
        assert w.partial_path.is_file()  # the first block's fragment is on the disk
    assert _frames(path) == 24
    assert not list(tmp_path.glob(".out.*"))  # no partial, no lock file left


def test_failed_run_keeps_the_existing_file_and_the_partial(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="denoise failed"):
        with VideoWriter(path, W, H, audio=_audio()) as w:
            for b in _blocks(2):
                w.write(b)
            raise RuntimeError("denoise failed")
    assert path.read_bytes() == b"precious"
    partial = partial_path_for(path)
    assert _frames(partial) == 24  # abandon() finished the file: both blocks are playable
    assert [p.path for p in find_partials(path, include_own=True)] == [partial]
    assert partials_note(path) is None  # our own pid: not "an earlier run"
    dead = partial_path_for(path, _dead_pid())
    partial.rename(dead)
    note = partials_note(path)
    assert note.startswith("a partial video from an earlier run is at ") and str(dead) in note
    assert "24 frames, 1.0 s" in note


def test_abandon_and_zero_frames_leave_the_final_name_alone(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"keep me")
    w = VideoWriter(path, W, H)
    w.write(_blocks(1)[0])
    assert w.abandon() == w.partial_path and w.close() is None
    assert path.read_bytes() == b"keep me" and _frames(w.partial_path) == 12
    with VideoWriter(path, W, H) as w2:  # no frame: nothing is created, nothing replaced
        pass
    assert path.read_bytes() == b"keep me" and not w2.partial_path.exists()
    # a later job of the same process writes under another name: the abandoned partial stays
    assert w2.partial_path != w.partial_path and _frames(w.partial_path) == 12


def test_final_false_writes_straight_to_the_path(tmp_path):
    path = tmp_path / "direct.mp4"
    with VideoWriter(path, W, H, final=False) as w:
        assert w.partial_path == path
        w.write(_blocks(1)[0])
        w.write(_blocks(1, seed=1)[0])
        assert path.is_file()
    assert _frames(path) == 24


_STOPPABLE = textwrap.dedent("""
    import signal, sys, time, numpy as np
    from lowvram.io.video_writer import VideoWriter
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # as the pipeline's StopFlag: a flag, polled
    rng = np.random.default_rng(0)
    with VideoWriter(sys.argv[1], 96, 64) as w:
        for b in range(200):
            w.write(rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8))
            print(b + 1, flush=True)
            if stop:
                break
            time.sleep(0.05)
""")


def test_a_stop_by_sigterm_renames_the_shorter_complete_video(tmp_path):
    path = tmp_path / "stopped.mp4"
    path.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _STOPPABLE, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        assert proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    blocks = 2 + len(rest.split())
    assert 2 <= blocks < 200
    assert _frames(path) == 12 * blocks
    assert not partial_path_for(path, proc.pid).exists()


# ---------------------------------------------------------------- the lock

_HOLDER = textwrap.dedent("""
    import sys, time, numpy as np
    from lowvram.io.video_writer import VideoWriter
    w = VideoWriter(sys.argv[1], 96, 64)
    w.write(np.zeros((12, 64, 96, 3), np.uint8))
    print("writing", flush=True)
    time.sleep(60)
""")


def test_a_second_writer_of_the_same_out_refuses_up_front(tmp_path):
    path = tmp_path / "same.mp4"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with pytest.raises(LowvramError, match=rf"being written by process {proc.pid} right now") as e:
            VideoWriter(path, W, H)
        assert "\n" not in str(e.value)
        with pytest.raises(LowvramError, match="being written by process"):
            lock_output(path)  # what a run takes before loading anything
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the dead holder's lock: the next run goes ahead
    with VideoWriter(path, W, H) as w:
        w.write(_blocks(1)[0])
    assert _frames(path) == 12 and not lock_path(path).exists()


def test_lock_taken_early_is_reused_by_the_writer_and_refused_twice(tmp_path):
    path = tmp_path / "job.mp4"
    with lock_output(path):
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with VideoWriter(path, W, H) as w:  # the run's own lock: no conflict
            w.write(_blocks(1)[0])
        assert lock_path(path).exists()  # still the run's until it releases it
        with pytest.raises(LowvramError, match="already being written by this process"):
            lock_output(tmp_path / "." / "job.mp4")  # a second job of a batch with the same --out
    assert not lock_path(path).exists()
    assert _frames(path) == 12


# ---------------------------------------------------------------- write errors

def _reference(tmp_path, blocks):
    """The bytes a clean run writes, and where each fragment (moof + mdat) ends."""
    ref = tmp_path / "ref.mp4"
    with VideoWriter(ref, W, H, audio=_audio(), final=False) as w:
        for b in blocks:
            w.write(b)
    boxes = _boxes(ref)
    assert [k for k, _, _ in boxes][:3] == ["ftyp", "moov", "moof"]
    return [end for kind, _, end in boxes if kind == "mdat"]


@pytest.mark.parametrize("cut", ["in moov", "in first mdat", "after 2 blocks", "in 4th moof"])
def test_enospc_cuts_back_to_the_last_complete_block(tmp_path, enospc, cut):
    blocks = _blocks(5, seed=3)
    ends = _reference(tmp_path, blocks)
    budget = {"in moov": 100, "in first mdat": ends[0] - 500, "after 2 blocks": ends[1] + 10,
              "in 4th moof": ends[2] + 50}[cut]
    kept_blocks = sum(e <= budget for e in ends)
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    enospc(video_writer, "_write", budget)
    w = VideoWriter(path, W, H, audio=_audio())
    with pytest.raises(VideoWriteError) as e:
        for b in blocks:
            w.write(b)
        w.close()
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "free space" in msg
    assert path.read_bytes() == b"old" and f"{path} was not changed" in msg
    assert e.value.frames == 12 * kept_blocks
    if kept_blocks:
        partial = e.value.partial_path
        assert partial == w.partial_path and str(partial) in msg
        assert f"first {12 * kept_blocks} frames ({12 * kept_blocks / 25:.1f} s)" in msg
        assert os.path.getsize(partial) == ends[kept_blocks - 1] == complete_end(partial)
        assert _frames(partial) == count_frames(partial) == 12 * kept_blocks
    else:
        assert e.value.partial_path is None and not w.partial_path.exists()
        assert "nothing was kept" in msg
    assert not lock_path(path).exists()
    assert w.abandon() is None  # already closed by the error


def test_eio_on_close_is_one_line_too(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    w = VideoWriter(path, W, H)
    for b in _blocks(3):
        w.write(b)

    def broken(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(video_writer, "_write", broken)
    with pytest.raises(VideoWriteError, match=r"Input/output error.*first 24 frames .*check the disk"):
        w.close()  # the last fragment and the trailer cannot be written; two blocks are whole
    assert not path.exists() and _frames(w.partial_path) == 24


def test_a_real_full_disk(small_tmpfs):
    disk = small_tmpfs("2m")
    path = disk / "out.mp4"
    path.write_bytes(b"old")
    w = VideoWriter(path, 128, 128)
    with pytest.raises(VideoWriteError, match="No space left on device") as e:
        for b in _blocks(40, seed=5, h=128, w=128):
            w.write(b)
        w.close()
    assert path.read_bytes() == b"old"
    frames = e.value.frames
    assert frames >= 12 and frames % 12 == 0
    assert _frames(e.value.partial_path) == frames
    assert os.path.getsize(e.value.partial_path) == complete_end(e.value.partial_path)
