"""BackgroundWriter: the mp4 encoder on its own thread gives the same video, keeps at most one block waiting,
and a disk error surfaces as the same VideoWriteError one block later, with the file cut back to whole blocks."""

import os
import threading

import av
import numpy as np
import pytest

from lowvram.io import video_writer
from lowvram.io.mp4frag import count_frames
from lowvram.io.video_writer import VideoWriteError, VideoWriter
from lowvram.io.writer_thread import BackgroundWriter

H, W, BLOCK = 64, 96, 12


def _blocks(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (BLOCK, H, W, 3), dtype=np.uint8) for _ in range(n)]


def _decoded(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _audio(seconds, seed=1):
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_same_video_as_the_plain_writer_and_the_same_shortest_rule(tmp_path):
    blocks = _blocks(4, seed=int.from_bytes(os.urandom(2), "little"))
    audio = _audio(1.7)  # ends inside block 4: 43 frames are kept, as the plain writer keeps
    with VideoWriter(tmp_path / "plain.mp4", W, H, audio=audio) as w:
        plain_kept = [w.write(b) for b in blocks]
    with BackgroundWriter(VideoWriter(tmp_path / "bg.mp4", W, H, audio=audio)) as w:
        bg_kept = [w.write(b) for b in blocks]
    assert bg_kept == plain_kept == [12, 12, 12, 7]
    a, b = _decoded(tmp_path / "plain.mp4"), _decoded(tmp_path / "bg.mp4")
    assert len(a) == len(b) == 43 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_encoding_runs_off_the_callers_thread_one_block_at_a_time(tmp_path, monkeypatch):
    inner = VideoWriter(tmp_path / "t.mp4", W, H)
    real, gate, seen = inner.write, threading.Event(), []

    def slow_write(frames):
        seen.append(threading.get_ident())
        if len(seen) == 2:
            assert gate.wait(30)  # block 2 waits here until the caller has moved on
        return real(frames)

    monkeypatch.setattr(inner, "write", slow_write)
    w = BackgroundWriter(inner)
    blocks = _blocks(3, seed=5)
    assert w.write(blocks[0]) == 12 and inner.frames_written == 12  # the first block is on disk at once
    assert w.write(blocks[1]) == 12 and inner.frames_written == 12  # returned while block 2 is being encoded
    gate.set()
    w.write(blocks[2])  # waits for block 2 first: at most one block is queued
    assert inner.frames_written >= 24
    w.close()
    assert threading.get_ident() not in seen and len(set(seen)) == 1
    assert count_frames(tmp_path / "t.mp4") == 36 and not inner.partial_path.exists()


def test_a_disk_error_surfaces_on_the_next_call_with_whole_blocks_kept(tmp_path, enospc):
    blocks = _blocks(5, seed=7)
    ref = tmp_path / "ref.mp4"
    with VideoWriter(ref, W, H) as w:
        for b in blocks[:2]:
            w.write(b)
    enospc(video_writer, "_write", os.path.getsize(ref) + 40)  # the 3rd block's fragment does not fit
    path = tmp_path / "out.mp4"
    w = BackgroundWriter(VideoWriter(path, W, H))
    with pytest.raises(VideoWriteError) as e:
        for b in blocks:
            w.write(b)
        w.close()
    assert e.value.frames == 24 and count_frames(e.value.partial_path) == 24 and not path.exists()
    assert "\n" not in str(e.value) and "No space left on device" in str(e.value)
    assert w.abandon() is None  # the inner writer was closed by the error
