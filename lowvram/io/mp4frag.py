"""What a fragmented MP4 holds: the end of its last complete fragment, and its frame count.

The writer's files are `ftyp`, `moov` (written with the first fragment), then one `moof` + `mdat` pair per
block, then `mfra` at a normal close. A box is an 8-byte header (32-bit big-endian size, 4-char type; size 1
means a 64-bit size follows, size 0 means "to the end of the file") and its payload. Cutting the file right
after the last `mdat` whose bytes are all there leaves a file every player opens, holding every complete
fragment: that is what a write error leaves behind.
"""

from __future__ import annotations

import os
import struct

import av


def complete_end(path) -> int:
    """Bytes of `path` up to the end of its last complete fragment (0 if it has none, or no `moov`)."""
    size = os.path.getsize(path)
    end = pos = 0
    seen_moov = in_fragment = False
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            box_size, kind = struct.unpack(">I4s", head[:8])
            if box_size == 1:
                if len(head) < 16:
                    break
                box_size = struct.unpack(">Q", head[8:16])[0]
            elif box_size == 0:
                break  # "to the end of the file": the writer never writes one, so this is damage
            if box_size < 8 or pos + box_size > size:
                break  # cut short: the write stopped inside this box
            if kind == b"moov":
                seen_moov = True
            elif kind == b"moof":
                in_fragment = True
            elif kind == b"mdat" and in_fragment and seen_moov:
                end, in_fragment = pos + box_size, False
            pos += box_size
    return end


def truncate_to_fragments(path) -> int:
    """Cut `path` after its last complete fragment; returns its new size (0: nothing playable was in it)."""
    end = complete_end(path)
    with open(path, "r+b") as f:
        f.truncate(end)
    return end


def count_frames(path) -> int:
    """Video frames in an MP4, by demuxing its packets (no decoding); 0 if it cannot be read."""
    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.video:
                return 0
            return sum(1 for p in c.demux(video=0) if p.size)
    except (av.error.FFmpegError, OSError, ValueError):
        return 0
