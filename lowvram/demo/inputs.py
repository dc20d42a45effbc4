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


def _write_wav(path, y: np.ndarray, sr: int) -> np.ndarray:
    """y: mono float in [-1, 1] -> 16-bit PCM WAV at sr; returns the samples written."""
    pcm = np.round(y * 32767).astype("<i2")
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return pcm


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
    _write_wav(path, y, sr)


# ---- photo-like portrait: shaded head-and-shoulders rendered with numpy (no model, no assets)

def _smooth_noise(rng, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random grid of cells_y x cells_x upsampled bicubically to [h, w]."""
    grid = rng.uniform(0, 255, (max(cells_y, 2), max(cells_x, 2))).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((w, h), Image.BICUBIC)
    return np.asarray(up, np.float32) / 127.5 - 1.0


def _fbm(rng, h, w, base: int, octaves: int = 4) -> np.ndarray:
    out, amp, total = np.zeros((h, w), np.float32), 1.0, 0.0
    for o in range(octaves):
        n = base * 2 ** o
        out += amp * _smooth_noise(rng, h, w, max(2, n * h // max(h, w)), max(2, n * w // max(h, w)))
        total += amp
        amp *= 0.5
    return out / total


def _blob(xx, yy, x0, y0, sx, sy) -> np.ndarray:
    return np.exp(-(((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2))


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a shape from a signed distance-like field d (< 0 inside), anti-aliased over `width`."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _over(img: np.ndarray, color, alpha: np.ndarray) -> None:
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(color, np.float32)


def photo_portrait(path: str, width: int = 720, height: int = 1280, seed: int = 0) -> None:
    """Write a photo-like head-and-shoulders portrait (PNG): a lit ellipsoid head with skin texture, eyes
    with irises and highlights, brows, nose and lips shaded by one soft key light from the upper left,
    ears, neck, a shirt with folds, strand-textured hair with a sheen, and a blurred indoor background."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px = min(w, h * 9 / 16) / 720  # feature sizes scale with the frame
    light = np.array([-0.45, -0.55, 0.70])
    light /= np.linalg.norm(light)

    # background: warm-to-cool wall, out-of-focus lights, vignette
    top, bottom = rng.uniform([150, 140, 130], [210, 200, 190]), rng.uniform([60, 70, 80], [110, 120, 130])
    t = (yy / h)[..., None]
    img = top * (1 - t) + bottom * t + 18 * _fbm(rng, h, w, 3)[..., None]
    bokeh = np.zeros((h, w, 3), np.float32)
    for _ in range(14):
        r = rng.uniform(30, 90) * px
        c = rng.uniform(150, 255, 3)
        bokeh += c * _soft(np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h * 0.7)) - r, 6 * px)[..., None] * 0.25
    img = img + np.asarray(Image.fromarray(np.clip(bokeh, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(12 * px)), np.float32)

    cx, cy, rx, ry = w / 2 + rng.uniform(-10, 10) * px, h * 0.39, 150 * px, 200 * px
    tone = rng.uniform(0.0, 0.7)  # light to brown skin along one line, so the hue stays a skin hue
    skin = np.array([238, 198, 172], np.float32) * (1 - tone) + np.array([150, 98, 68], np.float32) * tone
    ht = rng.uniform(0.0, 1.0)  # black -> brown -> blond
    hair_c = np.interp(ht, [0, 0.6, 1], [20, 105, 185]), np.interp(ht, [0, 0.6, 1], [16, 68, 145]), \
        np.interp(ht, [0, 0.6, 1], [13, 40, 90])
    hair_c = np.array(hair_c, np.float32)
    u, v = (xx - cx) / rx, (yy - cy) / ry

    def lit(nx, ny, nz, ambient=0.38):
        n = np.stack([nx, ny, nz], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-6
        return ambient + 0.72 * np.clip(n @ light, 0, None)

    # shirt and shoulders: the trapezius slope from the neck to rounded shoulders, with folds
    neck_w = 0.56 * rx
    reach = np.clip((np.abs(xx - cx) - neck_w) / (0.42 * w - neck_w), 0, 1)
    shoulder_y = cy + 1.45 * ry + 0.07 * h * reach ** 1.3
    shirt = _soft(shoulder_y - yy, 3 * px) * _soft(np.abs(xx - cx) - (0.44 * w + 0.25 * (yy - shoulder_y)), 6 * px)
    shirt_c = rng.uniform([20, 30, 50], [90, 110, 140])
    folds = 0.88 + 0.12 * _fbm(rng, h, w, 6) + 0.08 * (1 - yy / h)
    sx = np.clip((xx - cx) / (0.5 * w), -1, 1)
    shirt_img = shirt_c * (folds * lit(sx, -0.4 - 0.6 * (1 - reach), 1.0 + 0 * sx))[..., None]
    img = img * (1 - shirt[..., None]) + shirt_img * shirt[..., None]
    # neck: a lit cylinder, darker under the chin, down into a V of skin at the collar
    below = np.clip(yy - shoulder_y, 0, None)
    neck = _soft(np.abs(xx - cx) - (neck_w - 0.9 * below), 2 * px) * _soft(cy + 0.6 * ry - yy, 2 * px)
    nx = np.clip((xx - cx) / (neck_w * 1.3), -1, 1)
    neck_shade = lit(nx, 0 * nx, np.sqrt(1 - nx ** 2) + 0.1) * (1 - 0.45 * _blob(xx, yy, cx, cy + 0.95 * ry, 1.2 * rx,
                                                                                   0.25 * ry))
    img = img * (1 - neck[..., None]) + (skin * 0.93 * neck_shade[..., None]) * neck[..., None]

    # hair behind the head, then the ears
    hair_mask = _soft(np.hypot((xx - cx) / (1.17 * rx), (yy - cy + 0.10 * ry) / (1.06 * ry)) - 1, 0.01)
    hair_mask *= _soft(yy - (cy + (0.35 + 0.25 * rng.uniform()) * ry), 10 * px)
    streaks = _smooth_noise(rng, h, w, h // int(8 * px + 1), w // int(3 * px + 1))
    streaks = 0.65 * streaks + 0.35 * _smooth_noise(rng, h, w, h // int(20 * px + 1), w // int(2 * px + 1))
    hair_light = lit(u / 1.17, (v + 0.1) / 1.06, np.sqrt(np.clip(1 - (u / 1.17) ** 2 - ((v + 0.1) / 1.06) ** 2, 0.02, 1)),
                     ambient=0.25)
    sheen = 0.45 * _blob(xx, yy, cx - 0.35 * rx, cy - 0.85 * ry, 0.5 * rx, 0.12 * ry)
    hair_img = hair_c * (0.75 + 0.35 * streaks)[..., None] * hair_light[..., None] + 110 * sheen[..., None]
    img = img * (1 - hair_mask[..., None]) + hair_img * hair_mask[..., None]
    for side in (-1, 1):
        ear = _soft(np.hypot((xx - cx - side * 0.97 * rx) / (0.14 * rx), (yy - cy - 0.05 * ry) / (0.26 * ry)) - 1, 0.08)
        img = img * (1 - ear[..., None]) + (skin * 0.8 * lit(side + 0 * u, v, 0.6 + 0 * u)[..., None]) * ear[..., None]

    # face: an egg-shaped ellipsoid, narrower at the chin
    taper = 1 - 0.17 * np.clip(v, 0, 1) ** 1.6
    uf = u / taper
    r2 = uf ** 2 + v ** 2
    face = _soft(np.sqrt(r2) - 1, 2.5 / rx)
    nz = np.sqrt(np.clip(1 - r2, 0.0, 1))
    shade = lit(uf, v * 0.9, nz + 0.05)
    # relief: brow ridge and cheekbones catch light, eye sockets and the nose's shadow side are darker
    relief = 1.0 + 0.10 * _blob(xx, yy, cx - 0.45 * rx, cy + 0.15 * ry, 0.25 * rx, 0.12 * ry)
    relief -= 0.13 * (_blob(xx, yy, cx - 0.38 * rx, cy - 0.10 * ry, 0.2 * rx, 0.1 * ry)
                      + _blob(xx, yy, cx + 0.38 * rx, cy - 0.10 * ry, 0.2 * rx, 0.1 * ry))
    relief -= 0.16 * _blob(xx, yy, cx + 0.07 * rx, cy + 0.15 * ry, 0.05 * rx, 0.16 * ry)  # nose side
    relief += 0.10 * _blob(xx, yy, cx - 0.015 * rx, cy + 0.12 * ry, 0.025 * rx, 0.14 * ry)  # nose bridge
    relief += 0.10 * _blob(xx, yy, cx - 0.01 * rx, cy + 0.28 * ry, 0.05 * rx, 0.035 * ry)  # nose tip
    relief -= 0.12 * _blob(xx, yy, cx, cy + 0.66 * ry, 0.28 * rx, 0.05 * ry)  # under the lower lip
    texture = 1 + 0.035 * _fbm(rng, h, w, 24) + 0.018 * rng.standard_normal((h, w)).astype(np.float32)
    blush = (_blob(xx, yy, cx - 0.5 * rx, cy + 0.3 * ry, 0.22 * rx, 0.14 * ry)
             + _blob(xx, yy, cx + 0.5 * rx, cy + 0.3 * ry, 0.22 * rx, 0.14 * ry))
    face_c = (skin * (shade * relief * texture)[..., None]
              + np.array([10, -6, -6], np.float32) * blush[..., None])
    img = img * (1 - face[..., None]) + face_c * face[..., None]

    # the hair in front of the forehead, down to a hairline that drops at the temples
    hairline = cy - ry * (0.60 - 0.30 * np.clip(u, -1, 1) ** 2) + 0.04 * ry * _smooth_noise(rng, h, w, 2, 24)
    front = hair_mask * _soft(yy - hairline, 4 * px)
    img = img * (1 - front[..., None]) + hair_img * front[..., None]

    # nostrils and lips
    for side in (-1, 1):
        _over(img, skin * 0.35, 0.8 * face * _soft(np.hypot((xx - cx - side * 0.085 * rx) / (0.045 * rx),
                                                            (yy - cy - 0.335 * ry) / (0.018 * ry)) - 1, 0.3))
    mw, my = 0.30 * rx, cy + 0.53 * ry
    lip_c = skin * np.array([0.78, 0.48, 0.50]) * rng.uniform(0.9, 1.05)
    mu = (xx - cx) / mw
    upper = _soft(np.hypot(mu, (yy - my + 0.025 * ry) / (0.045 * ry)) - 1, 0.05) * (yy < my)
    upper *= 1 - 0.8 * _blob(xx, yy, cx, my - 0.07 * ry, 0.05 * rx, 0.03 * ry)  # the cupid's bow dip
    lower = _soft(np.hypot(mu * 0.95, (yy - my) / (0.07 * ry)) - 1, 0.05) * (yy >= my)
    lips = np.clip(upper + lower, 0, 1) * face
    lip_shade = (0.8 * (yy < my) + 1.0 * (yy >= my)) * (1 + 0.25 * _blob(xx, yy, cx - 0.05 * rx, my + 0.035 * ry,
                                                                         0.12 * rx, 0.02 * ry))
    img = img * (1 - lips[..., None]) + (lip_c * (lip_shade * shade)[..., None]) * lips[..., None]
    _over(img, lip_c * 0.35, face * _soft(np.abs(yy - my - 3 * px * mu ** 2) - 1.3 * px, 1.2 * px) * (np.abs(mu) < 1))

    # eyes: almond whites, textured irises, pupils, lash lines, creases and a catch-light
    iris_c = rng.choice([[70, 45, 25], [60, 90, 120], [80, 100, 60]]) * rng.uniform(0.8, 1.2)
    ey = cy - 0.08 * ry
    for side in (-1, 1):
        ex = cx + side * 0.40 * rx
        ew, eh = 0.21 * rx, 0.075 * ry
        a = (xx - ex) / ew
        almond = np.abs(yy - ey) - eh * np.sqrt(np.clip(1 - a ** 2, 0, 1)) * (1 - 0.25 * side * a)
        white = _soft(almond, 1.5 * px) * (np.abs(a) < 1)
        sclera = np.array([215, 205, 198], np.float32) * (0.75 + 0.2 * (1 - np.abs(a)))[..., None]
        img = img * (1 - white[..., None]) + sclera * white[..., None]
        ix, ir = ex + side * -0.02 * rx + rng.uniform(-2, 2) * px, 0.085 * rx
        d = np.hypot(xx - ix, yy - ey)
        ang = np.arctan2(yy - ey, xx - ix)
        fibres = 1 + 0.18 * np.sin(ang * 37 + 3 * np.sin(ang * 11)) * (d / ir)
        iris = _soft(d - ir, 1.2 * px) * white
        iris_img = iris_c * (fibres * (0.6 + 0.6 * d / ir) * (1 - 0.5 * (d > 0.85 * ir)))[..., None]
        img = img * (1 - iris[..., None]) + iris_img * iris[..., None]
        _over(img, (12, 10, 10), _soft(d - 0.38 * ir, 1.0 * px) * white)
        _over(img, (250, 250, 250), 0.9 * _soft(np.hypot(xx - ix + 0.3 * ir, yy - ey + 0.3 * ir) - 0.14 * ir, px))
        lid = eh * np.sqrt(np.clip(1 - a ** 2, 0, 1)) * (1 - 0.25 * side * a)
        lash = _soft(np.abs(yy - (ey - lid)) - 1.6 * px, 1.2 * px) * (np.abs(a) < 1.05)
        _over(img, hair_c * 0.4, 0.9 * lash * face)
        crease = _soft(np.abs(yy - (ey - lid - 0.045 * ry)) - 1.2 * px, 2 * px) * (np.abs(a) < 0.9)
        _over(img, skin * 0.6, 0.35 * crease * face)

    img = np.clip(img, 0, 255)
    pil = Image.fromarray(img.astype(np.uint8), "RGB")
    # hair strands on top (fringe, flyaways) and eyebrows, drawn as thin anti-aliased curves
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(1400 * px)):  # strands over the skull, from the crown down the sides
        k = rng.uniform(0.80, 1.0)
        side = rng.choice([-1, 1])
        th0 = -np.pi / 2 + rng.normal(0, 0.25)
        th = th0 + side * np.linspace(0, rng.uniform(0.3, 1.5), 24)
        pts = [(cx + k * 1.14 * rx * np.cos(a) + rng.normal(0, 0.6) * px,
                cy - 0.10 * ry + k * 1.03 * ry * np.sin(a)) for a in th]
        pts = [(x, y) for x, y in pts if y < cy + 0.45 * ry and (k > 0.93 or y < cy - 0.45 * ry)]
        shade_k = rng.uniform(0.5, 1.4)
        col = tuple(int(min(255, c * shade_k)) for c in hair_c) + (int(rng.uniform(50, 140)),)
        if len(pts) > 1:
            draw.line(pts, fill=col, width=max(1, int(rng.uniform(1, 2.2) * px)))
    for side in (-1, 1):
        bx = cx + side * 0.40 * rx
        for _ in range(int(160 * px)):
            s = rng.uniform(-1, 1)
            x = bx + s * 0.27 * rx
            y = ey - 0.22 * ry - 0.05 * ry * (1 - s ** 2) + (s * side) * 0.02 * ry
            ln = rng.uniform(6, 14) * px
            ang = -0.35 * side + s * side * 0.2 + rng.normal(0, 0.15)
            col = tuple(int(c * 0.8) for c in hair_c) + (int(rng.uniform(120, 220)),)
            draw.line([(x, y), (x + side * ln * np.cos(ang), y - ln * abs(np.sin(ang)) * 0.4)], fill=col,
                      width=max(1, int(1.5 * px)))
    pil = Image.alpha_composite(pil.convert("RGBA"), layer.filter(ImageFilter.GaussianBlur(0.6 * px))).convert("RGB")
    # lens: a touch of blur, vignette and sensor noise
    arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(0.7 * px)), np.float32)
    vignette = 1 - 0.22 * (((xx - w / 2) / (0.75 * w)) ** 2 + ((yy - h / 2) / (0.75 * h)) ** 2)
    arr = arr * vignette[..., None] + rng.normal(0.0, 2.2, arr.shape)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path, format="PNG")


# ---- speech: espeak-ng when the machine has it, else the synthetic voice

SPEECH_TEXT = (  # about 11 s at 150 words per minute: 6 clips of 48 frames
    "Hello, and welcome back. Today I want to tell you how the old stone bridge over the river was built. "
    "It took eleven years, three hundred workers, and a great deal of patience."
)


def speech_wav(path: str, text: str = SPEECH_TEXT, min_seconds: float = 10.0, sr: int = 16000, voice: str = "en-us",
               words_per_minute: int = 150, log=print) -> dict:
    """Write real synthetic speech as a 16-bit mono WAV at `sr`: espeak-ng speaking `text` (repeated until it
    lasts min_seconds), resampled with PyAV. Without espeak-ng on PATH it writes lowvram's voice-like
    synth_voice of min_seconds and says so. Returns {"source", "seconds", "sample_rate"}."""
    import shutil
    import subprocess
    import tempfile

    from lowvram.io.media import load_audio

    exe = shutil.which("espeak-ng")
    if exe is None:
        log("espeak-ng is not installed (apt-get install espeak-ng); writing the synthetic voice-like signal instead")
        synth_voice(path, seconds=min_seconds, sr=sr)
        return {"source": "synth_voice", "seconds": float(min_seconds), "sample_rate": sr}
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "speech.wav")
        spoken = text
        while True:
            subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", raw, spoken], check=True,
                           capture_output=True)
            y = load_audio(raw, sr=sr)  # espeak-ng writes 22050 Hz; PyAV resamples to sr
            if y.shape[0] >= min_seconds * sr:
                break
            spoken = spoken + " " + text
    y = 0.9 * y / max(float(np.max(np.abs(y))), 1e-6)
    pcm = _write_wav(path, y, sr)
    return {"source": f"espeak-ng ({voice}, {words_per_minute} wpm)", "seconds": pcm.shape[0] / sr,
            "sample_rate": sr}
