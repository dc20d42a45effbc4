"""Deterministic stand-in inputs for `lowvram demo` and the tests: a face-like portrait and a voice-like WAV."""

from __future__ import annotations

import os
import wave

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synth_portrait(path: str, width: int = 320, height: int = 384, seed: int = 0) -> None:
    """Write a synthetic face-like PNG (oval face, hair, eyes, nose, mouth, soft shading)."""
    rng = np.random.default_rng(seed)
    # background: vertical two-colour gradient
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(20, 120, 3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    bg = (top * (1 - t) + bottom * t) * np.ones((1, width, 1))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    cx, cy = width / 2, height * 0.48
    fw, fh = width * rng.uniform(0.28, 0.34), height * rng.uniform(0.30, 0.35)
    skin = np.array([rng.uniform(170, 235), rng.uniform(120, 180), rng.uniform(90, 150)])
    hair = tuple(int(v) for v in rng.uniform(10, 90, 3))
    draw.ellipse([cx - fw * 1.1, cy - fh * 1.12, cx + fw * 1.1, cy + fh * 0.6], fill=hair)
    draw.rectangle([cx - fw * 0.45, cy + fh * 0.8, cx + fw * 0.45, height], fill=tuple(
        int(v) for v in skin * 0.8))  # neck
    # face: concentric ellipses from dark rim to a lit centre (simple shading)
    steps = 12
    for k in range(steps):
        f = 1.0 - k / steps
        shade = skin * (0.78 + 0.22 * (k / (steps - 1)))
        ox, oy = fw * 0.08 * (1 - f), -fh * 0.1 * (1 - f)  # light from upper left
        draw.ellipse([cx - fw * f - ox, cy - fh * f + oy, cx + fw * f - ox, cy + fh * f + oy],
                     fill=tuple(int(v) for v in np.clip(shade, 0, 255)))
    # eyes: white, iris, pupil, brow
    ey, ex, er = cy - fh * 0.18, fw * 0.42, fw * 0.16
    iris = tuple(int(v) for v in rng.uniform(30, 140, 3))
    for side in (-1, 1):
        x = cx + side * ex
        draw.ellipse([x - er, ey - er * 0.6, x + er, ey + er * 0.6], fill=(245, 245, 240))
        draw.ellipse([x - er * 0.5, ey - er * 0.5, x + er * 0.5, ey + er * 0.5], fill=iris)
        pr = er * 0.22
        draw.ellipse([x - pr, ey - pr, x + pr, ey + pr], fill=(10, 10, 10))
        draw.line([x - er * 1.1, ey - er * 1.3, x + er * 1.1, ey - er * 1.5 + side * 2], fill=hair,
                  width=max(2, int(er * 0.35)))
    # nose and mouth
    nose = tuple(int(v) for v in skin * 0.7)
    draw.line([cx, ey + er, cx - fw * 0.08, cy + fh * 0.18, cx + fw * 0.04, cy + fh * 0.22],
              fill=nose, width=max(1, int(fw * 0.03)))
    my, mw = cy + fh * 0.45, fw * 0.38
    draw.chord([cx - mw, my - fh * 0.08, cx + mw, my + fh * 0.12], 0, 180, fill=(150, 40, 50))
    draw.line([cx - mw, my + fh * 0.02, cx + mw, my + fh * 0.02], fill=(90, 20, 30), width=2)
    img = img.filter(ImageFilter.GaussianBlur(radius=1.0))
    # faint sensor noise so that the picture is not piecewise flat
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 2.0, (height, width, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path, format="PNG")


def synth_voice(path: str, seconds: float = 2.0, seed: int = 0, sr: int = 16000) -> None:
    """Write a 16-bit mono WAV of voice-like sound: a gliding 120-220 Hz pitch with
    formant-shaped harmonics, syllable-rate loudness modulation and a little breath noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    # pitch contour: slow random wiggle between 120 and 220 Hz
    f0 = 170 + 30 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 2 * np.pi))
    f0 += 20 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * t + rng.uniform(0, 2 * np.pi))
    f0 = np.clip(f0, 120, 220)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(n)
    formants = rng.uniform([500, 1200, 2400], [800, 1800, 3000])
    for k in range(1, 25):
        fk = k * f0
        gain = sum(np.exp(-(((fk - fm) / 250.0) ** 2)) for fm in formants) + 0.3 / k
        voiced += np.where(fk < sr / 2, gain, 0.0) * np.sin(k * phase)
    # syllables at ~4-5 per second with short pauses between them
    rate = rng.uniform(4.0, 5.0)
    syll = np.clip(np.sin(np.pi * rate * t + rng.uniform(0, np.pi)), 0, None) ** 1.5
    y = voiced * syll + 0.02 * rng.standard_normal(n)
    y = 0.5 * y / np.max(np.abs(y))
    pcm = np.round(y * 32767).astype("<i2")
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
