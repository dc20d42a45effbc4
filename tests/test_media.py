"""Media I/O: --size parsing, reference sizes, image/audio loading, the streaming MP4 writer."""

import os
import signal
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lowvram.demo.inputs import synth_portrait, synth_voice
from lowvram.errors import LowvramError
from lowvram.io.media import gen_size, load_audio, load_image, parse_area
from lowvram.io.partials import partial_path_for, partials_note
from lowvram.io.video_writer import VideoWriter, check_output_path, to_uint8

FPS = 25


# ---------------------------------------------------------------- size

@pytest.mark.parametrize("text,area", [("704*384", 704 * 384), ("720x400", 720 * 400),
                                       (" 1280 X 720 ", 1280 * 720), ("64*64", 4096)])
def test_parse_area_accepts(text, area):
    assert parse_area(text) == area


@pytest.mark.parametrize("text", ["704", "704*", "*384", "0*384", "704*-384", "7.5*384", "abc",
                                  "63*64", "4097*4096", "704*384*2", ""])
def test_parse_area_rejects(text):
    with pytest.raises(LowvramError, match=r"--size must look like 704\*384"):
        parse_area(text)


@pytest.mark.parametrize("area", [704 * 384, 720 * 400])
def test_gen_size_reference_cases(area):
    assert gen_size(1280, 720, area) == (704, 384)  # 16:9
    assert gen_size(1920, 1080, area) == (704, 384)
    assert gen_size(720, 1280, area) == (384, 704)  # 9:16
    assert gen_size(1000, 1000, area) == (512, 512)  # square
    assert gen_size(720, 400, area) == (704, 384)


def _reference_size(h, w, target):
    """The reference's search written out independently (scales hi->lo, pad to 64)."""
    if h * w <= target:
        lo, hi = 0.1, 1.0
    else:
        b, a = 63 * (h + w), h * w
        lo = (-b + np.sqrt(b * b - 2 * a * (63 ** 2 - target))) / (2 * a)
        hi = np.sqrt(target / a)
    for i in range(100):
        s = hi - (hi - lo) * i / 100
        nh, nw = int(h * s), int(w * s)
        ph, pw = -(-nh // 64) * 64, -(-nw // 64) * 64
        if ph * pw <= target:
            return pw, ph
    return None


def test_gen_size_matches_search_and_budget():
    rng = np.random.default_rng(3)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(65, 3000, 2))
        area = int(rng.integers(64 * 64 * 2, 1280 * 720))
        W, H = gen_size(w, h, area)
        assert W % 64 == 0 and H % 64 == 0
        want = _reference_size(h, w, area)
        if want is not None:
            assert (W, H) == want
            assert W * H <= area


# ---------------------------------------------------------------- image

def _random_image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_load_image_resize_then_crop(tmp_path):
    p = tmp_path / "wide.png"
    _random_image(p, 1280, 720, 0)
    x, (w, h) = load_image(str(p), 704 * 384)
    assert (w, h) == (704, 384) and x.shape == (3, 384, 704) and x.dtype == torch.float32
    # short side 720 -> 384, long side int(384 * 1280 / 720) = 682, zero-padded 11 + 11 to 704
    ref = Image.open(p).convert("RGB").resize((682, 384), Image.BILINEAR)
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float().div(255) * 2 - 1
    assert torch.equal(x[:, :, 11:693], ref)
    assert torch.all(x[:, :, :11] == -1) and torch.all(x[:, :, 693:] == -1)


def test_load_image_pads_uneven_and_crops_tall(tmp_path):
    p = tmp_path / "odd.jpg"
    _random_image(p, 720, 400, 1)
    x, (w, h) = load_image(str(p), 720 * 400)
    assert (w, h) == (704, 384)
    # 720x400 -> 691x384, padded 6 left and 7 right (torchvision's split)
    assert torch.all(x[:, :, :6] == -1) and torch.all(x[:, :, 697:] == -1)
    assert not torch.all(x[:, :, 6] == -1) and not torch.all(x[:, :, 696] == -1)
    # a tall image is cropped: short side 263 -> min(W, H) = 192, long side truncated
    q = tmp_path / "tall.bmp"
    _random_image(q, 263, 700, 2)
    y, (w2, h2) = load_image(str(q), 256 * 320)
    assert (w2, h2) == gen_size(263, 700, 256 * 320) == (192, 384)
    long = int(192 * 700 / 263)  # 511
    big = Image.open(q).convert("RGB").resize((192, long), Image.BILINEAR)
    top = int(round((long - 384) / 2.0))  # 63.5 -> 64 (round half to even)
    want = np.asarray(big)[top:top + 384]
    got = ((y.permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    assert (long, top) == (511, 64) and np.array_equal(got, want)


def test_load_image_grayscale_and_range(tmp_path):
    p = tmp_path / "gray.png"
    Image.fromarray(np.full((70, 90), 255, np.uint8), "L").save(p)
    x, (w, h) = load_image(str(p), 704 * 384)
    assert (w, h) == gen_size(90, 70, 704 * 384)
    assert x.shape == (3, h, w) and x.max().item() == 1.0 and x.min().item() >= -1.0


@pytest.mark.parametrize("w,h,match", [
    (1, 1, "1x1 pixels, too small"), (31, 400, "31x400 pixels, too small"), (24, 24, "too small"),
    (2000, 20, "too small"), (401, 100, r"401x100 \(4.0:1\); the avatar needs a portrait between 1:4 and 4:1"),
    (100, 4000, r"\(40.0:1\)"), (64, 300, r"\(4.7:1\)"),
])
def test_load_image_refuses_tiny_and_extreme_shapes(tmp_path, w, h, match):
    p = tmp_path / "odd.png"
    _random_image(p, w, h, 5)
    for area in (704 * 384, 64 * 64):
        with pytest.raises(LowvramError, match=match) as e:
            load_image(str(p), area)
        assert "\n" not in str(e.value) and ("give a portrait" in str(e.value) or "crop it" in str(e.value))


@pytest.mark.parametrize("w,h,area,says", [
    (400, 100, 704 * 384, "the video is 448x128, smaller than --size allows"),
    (1600, 400, 704 * 384, None),                                # 4:1 within its budget: nothing to say
    (400, 100, 64 * 64, "cropped to the middle 25% of its width to fit 64x64"),
    (40, 40, 704 * 384, "the video is 64x64, smaller than --size allows, because the image is only 40x40"),
    (32, 128, 256 * 320, "only 32x128 (images are not scaled up); give a larger portrait for a larger video; "
                         "cropped to the middle 50% of its height to fit 64x128"),
    (1280, 720, 704 * 384, None),                                # the reference's own example (3% padding)
    (100, 60, 128 * 64, "padded with black to 128x64"),
])
def test_load_image_says_what_it_did(tmp_path, w, h, area, says):
    p = tmp_path / "img.png"
    _random_image(p, w, h, 6)
    lines = []
    x, (gw, gh) = load_image(str(p), area, log=lines.append)
    assert x.shape == (3, gh, gw) and gw >= 64 and gh >= 64 and gw % 64 == 0 and gh % 64 == 0
    if says is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"note: {p}: ") and says in lines[0], lines


def test_load_image_errors(tmp_path):
    with pytest.raises(LowvramError, match="image file not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"), 704 * 384)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    with pytest.raises(LowvramError, match="cannot read image .*notes.png"):
        load_image(str(bad), 704 * 384)
    trunc = tmp_path / "trunc.png"
    _random_image(trunc, 64, 64, 4)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(LowvramError, match="cannot read image .*trunc.png"):
        load_image(str(trunc), 704 * 384)


# ---------------------------------------------------------------- audio

def _write_tone(path, codec, fmt, seconds=1.3, rate=44100, freq=440.0):
    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    data = np.stack([tone, tone])  # [2, n] stereo
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=rate, layout="stereo")
        s.codec_context.options = {"strict": "experimental"}  # FFmpeg's vorbis encoder
        layout_fmt = s.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        rs = av.AudioResampler(format=layout_fmt, layout="stereo", rate=rate)
        for f in rs.resample(frame):
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return seconds


def _encodable(codec):
    try:
        av.codec.Codec(codec, "w")
        return True
    except av.error.FFmpegError:
        return False


@pytest.mark.parametrize("ext,codec,fmt,rate", [
    ("wav", "pcm_s16le", "wav", 44100), ("flac", "flac", "flac", 44100),
    ("mp3", "libmp3lame", "mp3", 44100), ("m4a", "aac", "ipod", 44100),
    ("ogg", "libopus", "ogg", 48000), ("oga", "vorbis", "ogg", 44100),
])
def test_load_audio_formats(tmp_path, ext, codec, fmt, rate):
    if not _encodable(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    path = tmp_path / f"tone.{ext}"
    seconds = _write_tone(path, codec, fmt, rate=rate)
    y = load_audio(str(path))
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size / 16000 - seconds) <= 0.01 * seconds + 0.03  # encoder priming/padding
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    peak_hz = np.argmax(spec) * 16000 / y.size
    assert abs(peak_hz - 440) < 3
    assert 0.4 < np.max(np.abs(y)) < 0.6  # equal channels average to the same 0.5 tone


def test_load_audio_resample_rate(tmp_path):
    path = tmp_path / "tone.wav"
    seconds = _write_tone(path, "pcm_s16le", "wav", seconds=0.7, rate=22050, freq=300)
    y = load_audio(str(path), sr=8000)
    assert abs(y.size - round(seconds * 8000)) <= 2
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) * 8000 / y.size - 300) < 3


def test_load_audio_errors(tmp_path):
    with pytest.raises(LowvramError, match="audio file not found: .*gone.wav"):
        load_audio(str(tmp_path / "gone.wav"))
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(LowvramError, match=r"cannot decode audio file .*junk.mp3 \(Invalid data"):
        load_audio(str(junk))
    img = tmp_path / "pic.png"
    _random_image(img, 32, 32, 6)
    with pytest.raises(LowvramError, match="pic.png has no audio stream; give a wav, mp3"):
        load_audio(str(img))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(LowvramError, match="cannot decode audio file .*empty.wav"):
        load_audio(str(empty))
    silent = tmp_path / "silent.wav"
    with av.open(str(silent), "w", format="wav") as out:
        s = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        f = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.int16), format="s16", layout="mono")
        f.sample_rate, f.pts = 16000, 0
        out.mux(s.encode(f))
        out.mux(s.encode(None))
    with pytest.raises(LowvramError, match="audio file .*silent.wav is silent"):
        load_audio(str(silent))
    short = tmp_path / "short.wav"
    synth_voice(str(short), seconds=0.5, seed=2)
    assert load_audio(str(short), min_seconds=0.4).size == 8000
    with pytest.raises(LowvramError, match=r"short.wav lasts 0.50 s; at least 1.00 s is needed"):
        load_audio(str(short), min_seconds=1.0)


# ---------------------------------------------------------------- demo inputs

def test_synth_inputs_deterministic(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    synth_portrait(str(a), seed=1)
    synth_portrait(str(b), seed=1)
    synth_portrait(str(c), seed=2, width=200, height=248)
    ia, ib, ic = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert ia.shape == (384, 320, 3) and ic.shape == (248, 200, 3)
    assert np.array_equal(ia, ib) and ia.std() > 20
    # the face is brighter than the background at the image centre vs corner
    assert ia[190, 160].astype(int).sum() != ia[2, 2].astype(int).sum()
    synth_voice(str(tmp_path / "v1.wav"), seconds=1.5, seed=3)
    synth_voice(str(tmp_path / "v2.wav"), seconds=1.5, seed=3)
    v1, v2 = load_audio(str(tmp_path / "v1.wav")), load_audio(str(tmp_path / "v2.wav"))
    assert np.array_equal(v1, v2) and v1.size == 24000 and np.max(np.abs(v1)) > 0.3
    spec = np.abs(np.fft.rfft(v1))
    f0 = np.argmax(spec[: int(300 * 1.5)]) / 1.5  # strongest component below 300 Hz
    assert 110 <= f0 <= 230
    env = np.abs(v1).reshape(-1, 400).max(axis=1)  # 25 ms windows: syllables rise and fall
    assert env.max() > 4 * env.min()


# ---------------------------------------------------------------- video writer

def _frames(rng, t, h, w):
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _decode(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        vs = c.streams.video[0]
        rate = vs.average_rate
    samples, arate = 0, None
    with av.open(str(path)) as c:
        if c.streams.audio:
            arate = c.streams.audio[0].rate
            samples = sum(f.samples for f in c.decode(audio=0))
    return frames, rate, samples, arate


def test_to_uint8_matches_reference_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 9, generator=g) * 0.7  # some values outside [-1, 1]
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 2.0])
    y = to_uint8(x)
    assert y.dtype == torch.uint8 and y.shape == (5, 7, 9, 3)
    want = np.floor((np.clip(x.numpy(), -1, 1) + 1) / 2 * 255).astype(np.uint8)
    assert np.array_equal(y.numpy(), want.transpose(1, 2, 3, 0))
    assert y[0, 0, :4, 0].tolist() == [0, 255, 127, 255]  # truncation: 127.5 -> 127
    assert torch.equal(to_uint8(x[None]), y)
    xb = x.bfloat16()
    assert torch.equal(to_uint8(xb), to_uint8(xb.float()))  # computed in float32
    with pytest.raises(ValueError):
        to_uint8(x[:2])


def test_writer_frames_fps_and_audio(tmp_path):
    rng = np.random.default_rng(7)
    sr = 16000
    audio = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(sr * 3.0)) / sr)).astype(np.float32)
    path = tmp_path / "out.mp4"
    h, w = 64, 96
    video = torch.rand(3, 12, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with VideoWriter(str(path), w, h, audio=audio, audio_rate=sr) as wr:
        assert wr.write(_frames(rng, 9, h, w)) == 9
        assert wr.write(video) == 12
        assert wr.write(_frames(rng, 12, h, w)) == 12
    frames, rate, samples, arate = _decode(path)
    assert len(frames) == 33 and rate == FPS and arate == sr
    video_s, audio_s = 33 / FPS, samples / sr
    # audio is cut at the video's end; AAC pads the last 1024-sample packet with silence
    assert video_s - 1 / FPS <= audio_s <= video_s + 1024 / sr
    # H.264 at crf 10 keeps a smooth frame close to its input
    smooth = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3))
    with VideoWriter(str(tmp_path / "s.mp4"), w, h) as wr:
        wr.write(np.stack([smooth] * 3))
    got, _, samples, _ = _decode(tmp_path / "s.mp4")
    assert len(got) == 3 and samples == 0
    assert np.abs(got[1].astype(int) - smooth).mean() < 3


def test_writer_shortest_drops_frames_after_audio(tmp_path):
    rng = np.random.default_rng(8)
    sr = 48000
    audio = (0.2 * np.sin(2 * np.pi * 200 * np.arange(int(sr * 0.5)) / sr)).astype(np.float32)
    path = tmp_path / "short.mp4"
    with VideoWriter(str(path), 32, 32, audio=audio, audio_rate=sr) as wr:
        assert wr.write(_frames(rng, 10, 32, 32)) == 10
        assert wr.write(_frames(rng, 10, 32, 32)) == 3  # 0.5 s of audio = 12.5 frames -> 13
        assert wr.write(_frames(rng, 4, 32, 32)) == 0
    frames, _, samples, _ = _decode(path)
    assert len(frames) == 13
    assert abs(samples / sr - 0.5) <= 1024 / sr


def test_writer_zero_frames_and_bad_paths(tmp_path):
    path = tmp_path / "empty.mp4"
    with VideoWriter(str(path), 32, 32):
        pass
    assert not path.exists()
    with pytest.raises(LowvramError, match="output folder .*missing.* does not exist"):
        VideoWriter(str(tmp_path / "missing" / "a.mp4"), 32, 32)
    with pytest.raises(LowvramError, match="output folder .*missing.* does not exist"):
        check_output_path(str(tmp_path / "missing" / "a.mp4"))
    with pytest.raises(LowvramError, match="--out must be an .mp4 file path"):
        check_output_path(str(tmp_path / "a.avi"))
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(LowvramError, match="is a directory"):
        check_output_path(str(tmp_path / "dir.mp4"))
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="even width and height"):
        VideoWriter(str(tmp_path / "odd.mp4"), 33, 32)
    assert not (tmp_path / "odd.mp4").exists()
    with VideoWriter(str(tmp_path / "x.mp4"), 32, 32) as wr:
        with pytest.raises(ValueError, match=r"frames must be uint8 \[T, 32, 32, 3\]"):
            wr.write(np.zeros((2, 30, 32, 3), np.uint8))
        wr.write(_frames(np.random.default_rng(0), 2, 32, 32))
    assert len(_decode(tmp_path / "x.mp4")[0]) == 2


_CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    from lowvram.io.video_writer import VideoWriter
    path, blocks = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(16000 * 10) * 0.1)).astype(np.float32)
    w = VideoWriter(path, 96, 64, audio=audio)
    for b in range(blocks):
        w.write(rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8))
        print(b + 1, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("killed_after", [2, 4])
def test_writer_survives_sigkill(tmp_path, killed_after):
    path = tmp_path / "crash.mp4"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(killed_after)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(killed_after):
            assert proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing under the final name; the frames are in the hidden partial file beside it
    assert not path.exists()
    partial = partial_path_for(path, proc.pid)
    assert partial.is_file()
    frames, rate, samples, _ = _decode(partial)
    # every block but the last one written is in a finished fragment
    assert len(frames) == 12 * (killed_after - 1)
    if frames:
        assert rate == FPS and samples > 0
    # the next run is told where it is and how much it holds
    note = partials_note(path)
    assert str(partial) in note and f"{len(frames)} frames" in note
    # the dead writer's lock does not block the next writer
    with VideoWriter(str(path), 96, 64) as w:
        w.write(np.zeros((2, 64, 96, 3), np.uint8))
    assert len(_decode(path)[0]) == 2 and partial.is_file()
