"""Inputs of `lowvram run`: the --size budget, the reference image and the driving audio.

Sizes and the image path follow the reference pipeline exactly (its `get_size_less_than_area`
and torchvision's `Resize(short side)` + `CenterCrop` + `ToTensor`), re-done with Pillow so that
torchvision is not needed. Audio is decoded and resampled with PyAV.
"""

from __future__ import annotations

import math
import os
import re

import av
import numpy as np
import torch
from PIL import Image

from lowvram.errors import LowvramError

DIVISOR = 64  # generated H and W are padded up to multiples of this
MIN_AREA = 64 * 64
MAX_AREA = 4096 * 4096
SILENCE_PEAK = 1e-4  # a file whose loudest sample is below this is treated as silent
MIN_IMAGE_SIDE = 32  # px: below this a portrait holds no face worth animating (it is scaled to >= 64 px)
MAX_ASPECT = 4.0  # long side / short side of the portrait: beyond it the video is a strip, not an avatar
SMALL_NOTE = 0.5  # an image below this share of the --size area gives a smaller video: said
CROP_NOTE = 0.8  # keeping less than this share of the width or height is said
PAD_NOTE = 0.1  # black padding of more than this share of a side is said
AUDIO_KINDS = "a wav, mp3, m4a, flac or ogg file"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX]\s*(\d+)\s*$")


def parse_dims(s: str) -> tuple[int, int]:
    """Parse --size "W*H" (or "WxH") into (W, H); its product is the pixel-area budget of `gen_size`."""
    match = _SIZE_RE.match(str(s))
    if match is not None:
        w, h = int(match.group(1)), int(match.group(2))
        if w > 0 and h > 0 and MIN_AREA <= w * h <= MAX_AREA:
            return w, h
    raise LowvramError(
        f"--size must look like 704*384 (WIDTH*HEIGHT: positive integers, area between 64*64 "
        f"and 4096*4096); got {s!r}"
    )


def parse_area(s: str) -> int:
    """Parse --size "W*H" into the pixel-area budget W*H (the output keeps the portrait's aspect ratio)."""
    w, h = parse_dims(s)
    return w * h


def gen_size(img_w: int, img_h: int, max_area: int) -> tuple[int, int]:
    """Output (W, H) for an img_w x img_h reference image under a pixel budget.

    The reference's rule: try 100 scales from the largest down; scale the image, pad each side
    up to a multiple of 64 and keep the first candidate whose padded area fits the budget.
    """
    if img_w <= 0 or img_h <= 0:
        raise ValueError(f"image size must be positive, got {img_w}x{img_h}")
    h, w = img_h, img_w
    if h * w <= max_area:
        lo, hi = 0.1, 1.0
    else:
        # smallest scale at which even worst-case padding (63 px per side) fits the budget
        d = DIVISOR - 1
        a, b, c = h * w, d * (h + w), d * d - max_area
        lo = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        hi = math.sqrt(max_area / (h * w))
    for i in range(100):
        scale = hi - (hi - lo) * i / 100
        sh, sw = int(h * scale), int(w * scale)
        ph = sh + (DIVISOR - sh % DIVISOR) % DIVISOR
        pw = sw + (DIVISOR - sw % DIVISOR) % DIVISOR
        if ph * pw <= max_area:
            return pw, ph
    # no scale fitted: the reference falls back to aspect-ratio sizes floored to the divisor
    aspect = w / h
    tw = int((max_area * aspect) ** 0.5 // DIVISOR * DIVISOR)
    th = int((max_area / aspect) ** 0.5 // DIVISOR * DIVISOR)
    if tw >= w or th >= h:
        tw, th = int(w // DIVISOR * DIVISOR), int(h // DIVISOR * DIVISOR)
    return tw, th


def _resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """torchvision `Resize(int)` on a PIL image: short side -> `short`, long side truncated."""
    w, h = img.size
    s, l = (w, h) if w <= h else (h, w)
    new_s, new_l = short, int(short * l / s)
    new_w, new_h = (new_s, new_l) if w <= h else (new_l, new_s)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # antialiased, as for PIL input


def _center_crop(img: Image.Image, out_w: int, out_h: int) -> Image.Image:
    """torchvision `CenterCrop((H, W))` on a PIL image: zero-pad if too small, then crop."""
    w, h = img.size
    if out_w > w or out_h > h:
        left = (out_w - w) // 2 if out_w > w else 0
        top = (out_h - h) // 2 if out_h > h else 0
        padded = Image.new(img.mode, (w + max(out_w - w, 0), h + max(out_h - h, 0)), 0)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if (w, h) == (out_w, out_h):
            return img
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


def load_image(path: str, size_area: int, log=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load the reference image as the model sees it.

    Returns the image as float32 [3, H, W] in [-1, 1] and the generation size (W, H) from
    `gen_size`. EXIF orientation is ignored, as in the reference. An image too small (short side below
    MIN_IMAGE_SIDE) or too elongated (beyond MAX_ASPECT:1) is refused with what to do; a video made
    smaller by a small image, a large crop or wide black padding is said in one line through `log`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LowvramError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LowvramError(
            f"cannot read image {path}: Pillow cannot open it as an image "
            f"({type(e).__name__}); give a png, jpg or webp file"
        ) from e
    check_image_shape(path, rgb.width, rgb.height)
    w, h = gen_size(rgb.width, rgb.height, size_area)
    if w < DIVISOR or h < DIVISOR:  # not reached within MAX_ASPECT and MIN_AREA; kept as the model's floor
        raise LowvramError(f"image {path} ({rgb.width}x{rgb.height}) gives a {w}x{h} video under --size; "
                           f"each side needs at least {DIVISOR} px: raise --size or crop the image")
    resized = _resize_short_side(rgb, min(w, h))
    pic = _center_crop(resized, w, h)
    note = describe_fit(rgb.width, rgb.height, resized.width, resized.height, w, h, size_area)
    if note and log is not None:
        log(f"note: {path}: {note}")
    x = torch.from_numpy(np.asarray(pic, dtype=np.uint8).copy())  # x: [H, W, 3] uint8
    x = x.permute(2, 0, 1).float().div(255) * 2 - 1.0  # x: [3, H, W] in [-1, 1]
    return x.contiguous(), (w, h)


def check_image_shape(path: str, width: int, height: int) -> None:
    """Refuse a portrait the model cannot use as it is, saying what to do."""
    short, long = min(width, height), max(width, height)
    if short < MIN_IMAGE_SIDE:
        raise LowvramError(f"image {path} is {width}x{height} pixels, too small to hold a face; give a portrait "
                           f"with at least {MIN_IMAGE_SIDE} px on its short side (512 or more looks best)")
    if long > MAX_ASPECT * short:
        raise LowvramError(f"image {path} is {width}x{height} ({long / short:.1f}:1); the avatar needs a portrait "
                           f"between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1: crop it around the head and shoulders")


def describe_fit(img_w: int, img_h: int, res_w: int, res_h: int, out_w: int, out_h: int,
                 size_area: int) -> str | None:
    """What resize (to res_w x res_h) + center crop/pad did to an img_w x img_h image for an out_w x out_h
    video under a --size area budget, when it is worth saying; None otherwise."""
    done = []
    if img_w * img_h < SMALL_NOTE * size_area:
        done.append(f"the video is {out_w}x{out_h}, smaller than --size allows, because the image is only "
                    f"{img_w}x{img_h} (images are not scaled up); give a larger portrait for a larger video")
    kept_w, kept_h = min(1.0, out_w / res_w), min(1.0, out_h / res_h)
    if min(kept_w, kept_h) < CROP_NOTE:
        side = "width" if kept_w < kept_h else "height"
        done.append(f"cropped to the middle {100 * min(kept_w, kept_h):.0f}% of its {side} to fit {out_w}x{out_h}")
    if max(out_w - res_w, 0) > PAD_NOTE * out_w or max(out_h - res_h, 0) > PAD_NOTE * out_h:
        done.append(f"padded with black to {out_w}x{out_h}")
    return "; ".join(done) or None


def load_audio(path: str, sr: int = 16000, min_seconds: float = 0.0) -> np.ndarray:
    """Decode any audio file PyAV reads to mono float32 [S] at `sr` Hz.

    Channels are resampled with PyAV's AudioResampler, then averaged to mono.

    Raises LowvramError for a missing, undecodable, silent or too short (< min_seconds) file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LowvramError(f"audio file not found: {path}")
    chunks = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise LowvramError(f"{path} has no audio stream; give {AUDIO_KINDS}")
            stream = container.streams.audio[0]
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:  # keep the channels: they are averaged below
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sr)
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            if resampler is not None:
                chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    except (av.error.FFmpegError, ValueError) as e:
        msg = (getattr(e, "strerror", None) or str(e)).replace("\n", " ")
        raise LowvramError(f"cannot decode audio file {path} ({msg}); give {AUDIO_KINDS}") from e
    # chunks: [C, n] each. Mono is the plain channel mean, as librosa's to_mono (the reference's
    # loader) does; swresample's own downmix would scale stereo by 1/sqrt(2) instead of 1/2.
    audio = np.concatenate(chunks, axis=1).mean(axis=0) if chunks else np.zeros(0)
    audio = audio.astype(np.float32)
    if audio.size == 0:
        raise LowvramError(f"audio file {path} holds no samples; give {AUDIO_KINDS} with speech")
    peak = float(np.max(np.abs(audio)))
    if not peak >= SILENCE_PEAK:
        raise LowvramError(
            f"audio file {path} is silent (peak {peak:.1e}); the avatar needs audible speech"
        )
    seconds = audio.size / sr
    if seconds < min_seconds:
        raise LowvramError(
            f"audio file {path} lasts {seconds:.2f} s; at least {min_seconds:.2f} s is needed"
        )
    return audio
