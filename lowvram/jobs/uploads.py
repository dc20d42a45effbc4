"""Checks of the page's uploads, before a job is queued: each problem is one LowvramError line that names
the file as the user knows it (not Gradio's temporary path).

The checks are the pipeline's own (lowvram.io.media: not an image, undecodable, silent or too short
audio) plus a size limit per file; Gradio's `max_file_size` refuses larger uploads before they land.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.constants import AUDIO_RATE, FPS, FRAMES_PER_BLOCK
from lowvram.errors import LowvramError

MAX_UPLOAD_MB = 50
MIN_AUDIO_SECONDS = FRAMES_PER_BLOCK * 4 / FPS   # one block of video: 12 frames at 25 fps


def upload_path(payload) -> tuple[str, str] | None:
    """(path on the server, the name the user gave it) of a Gradio file payload (dict or path), or None."""
    if payload is None:
        return None
    if isinstance(payload, (str, os.PathLike)):
        return str(payload), Path(payload).name
    path = payload.get("path")
    if not path:
        return None
    return str(path), payload.get("orig_name") or Path(path).name


def _named(e: LowvramError, path: str, name: str) -> LowvramError:
    return LowvramError(str(e).replace(path, name))


def _size_ok(path: str, name: str, what: str, limit_mb: float) -> None:
    mb = os.path.getsize(path) / 2**20
    if mb > limit_mb:
        raise LowvramError(f"{what} {name} is {mb:.0f} MB; the page takes files up to {limit_mb:.0f} MB")


def check_portrait(payload, size: str = "704*384", limit_mb: float = MAX_UPLOAD_MB) -> tuple[str, str]:
    """(path, name) of a readable portrait; the generated size comes from it and `size`."""
    from lowvram.io.media import load_image, parse_area

    got = upload_path(payload)
    if got is None:
        raise LowvramError("no portrait: upload a picture of a face (png, jpg or webp)")
    path, name = got
    _size_ok(path, name, "portrait", limit_mb)
    try:
        load_image(path, parse_area(size))
    except LowvramError as e:
        raise _named(e, path, name) from None
    return path, name


def check_voice(payload, limit_mb: float = MAX_UPLOAD_MB) -> tuple[str, str, float]:
    """(path, name, seconds) of audible speech at least one block long."""
    from lowvram.io.media import load_audio

    got = upload_path(payload)
    if got is None:
        raise LowvramError("no voice: upload a recording (wav, mp3, m4a, flac or ogg) or record one")
    path, name = got
    _size_ok(path, name, "voice", limit_mb)
    try:
        wave = load_audio(path, sr=AUDIO_RATE, min_seconds=MIN_AUDIO_SECONDS)
    except LowvramError as e:
        raise _named(e, path, name) from None
    return path, name, wave.size / AUDIO_RATE
