"""The live preview: the newest frames of the fragmented mp4 a job is writing, as a looping animation.

The writer's file is `ftyp moov (moof mdat)* [mfra]`: each block starts a key frame and so a fragment,
and a fragment is on disk once the next one begins (lowvram.io.video_writer). `FragmentReader` reads
the complete `moof mdat` pairs appended since its last call; the init segment (`ftyp moov`) plus those
pairs is itself a valid mp4 (the fragments address their data from their own `moof`), which PyAV
decodes. Each batch of new frames becomes one animated WebP (`preview/NNNN.webp`, 25 fps, looping),
shown by the page's image component: a browser plays animated WebP natively, Gradio serves it as a
file, and nothing has to be re-encoded or streamed. Work runs on its own thread, off the generation loop.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
from pathlib import Path

import av
import numpy as np
from PIL import Image

MAX_SIDE = 384         # preview frames are scaled down to at most this many pixels on the long side
MIN_SIDE = 256         # and small ones (the tiny checkpoint's) up to this many, so that a person can see them


class FragmentReader:
    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0
        self.init = b""

    def read_new(self) -> bytes | None:
        """init segment + the complete fragments written since the last call, or None if none."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return None
        pos = consumed = 0
        frags, moof = [], None
        while pos + 8 <= len(data):
            size, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if size == 1 and pos + 16 <= len(data):
                size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            if size < 8 or pos + size > len(data):
                break  # a box still being written
            box = data[pos:pos + size]
            pos += size
            if kind in (b"ftyp", b"moov"):
                self.init += box
            elif kind == b"moof":
                moof = box
                continue  # consumed only with its mdat
            elif kind == b"mdat" and moof is not None:
                frags.append(moof + box)
                moof = None
            consumed = pos
        self.offset += consumed
        if not frags or not self.init:
            return None
        return self.init + b"".join(frags)


def decode_frames(mp4: bytes) -> list[np.ndarray]:
    """Video frames [H, W, 3] uint8 of an in-memory mp4."""
    with av.open(io.BytesIO(mp4)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def write_animation(frames: list[np.ndarray], path, fps: int = 25) -> Path:
    """Frames -> a looping animated WebP whose long side is between MIN_SIDE and MAX_SIDE."""
    pics = [Image.fromarray(f) for f in frames]
    w, h = pics[0].size
    scale = min(1.0, MAX_SIDE / max(w, h)) if max(w, h) >= MIN_SIDE else MIN_SIDE / max(w, h)
    if scale != 1:
        mode = Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST
        pics = [p.resize((max(2, round(w * scale)), max(2, round(h * scale))), mode) for p in pics]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pics[0].save(tmp, format="WEBP", save_all=True, append_images=pics[1:], duration=round(1000 / fps), loop=0,
                 quality=80)
    tmp.replace(path)
    return path


def first_frame(video, path) -> Path | None:
    """The video's first frame as a PNG (the gallery's picture), or None if it has none."""
    try:
        with av.open(str(video)) as c:
            frame = next(c.decode(video=0), None)
    except (av.error.FFmpegError, OSError):
        return None
    if frame is None:
        return None
    frame.to_image().save(path, format="PNG")
    return Path(path)


def _being_written(path: Path) -> Path:
    """`path`, or while it does not exist yet the newest file beside it named after it (a writer that
    writes to a temporary name and renames it into place when closed)."""
    if path.exists() or not path.parent.is_dir():
        return path
    near = [p for p in path.parent.iterdir() if path.stem in p.name and p.suffix != ".json" and p.is_file()]
    return max(near, key=lambda p: p.stat().st_mtime) if near else path


class PreviewMaker:
    """feed(mp4 path) after each block; on_preview(webp path, frames shown) when a new animation is ready."""

    def __init__(self, folder, on_preview):
        self.folder = Path(folder)
        self.on_preview = on_preview
        self.reader: FragmentReader | None = None
        self.count = 0
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="lowvram-preview", daemon=True)
        self._thread.start()

    def feed(self, path) -> None:
        self._q.put(Path(path))

    def close(self, final=None, timeout: float = 30.0) -> None:
        """Show what remains (the last fragment is on disk once the file is closed), then stop."""
        if final is not None:
            self._q.put(Path(final))
        self._q.put(None)
        self._thread.join(timeout)

    def _loop(self):
        while (path := self._q.get()) is not None:
            try:
                self._update(path)
            except Exception as e:  # a preview must never stop a job
                print(f"preview: {type(e).__name__}: {e}")

    def _update(self, path: Path):
        path = _being_written(path)
        if self.reader is None:
            self.reader = FragmentReader(path)
        self.reader.path = path  # the partial file renamed when complete: same bytes, keep the offset
        data = self.reader.read_new()
        if data is None:
            return
        frames = decode_frames(data)
        if not frames:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        out = write_animation(frames, self.folder / f"{self.count:04d}.webp")
        self.on_preview(out, len(frames))
