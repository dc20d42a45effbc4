"""The full-size checkpoint writer (lowvram.demo.full) at tiny widths: every file of the real layout loads
through lowvram's own loaders, the keys and shapes are the meta model's, and host RAM stays bounded."""

import json
import math
import shutil
import zipfile

import numpy as np
import pytest
import torch

from lowvram.constants import INDEX_FILE, T5_FILE, VAE_FILE
from lowvram.demo.full import FullSpec, dit_entries, dit_shards, lora_entries, plan_files, shard_bytes_for, write_full
from lowvram.demo.stream import PthStream, pth_pickle

PIECE = 1 << 18  # 256 Ki values per piece (1 MiB of fp32): the T5 embedding is 64 pieces
THREADS = 2
T5_DIM = 256  # a 131 MB umT5 embedding: a writer that held a whole tensor would show it in the peak RSS


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    spec = FullSpec.small(t5_dim=T5_DIM)
    root = tmp_path_factory.mktemp("full")
    return spec, write_full(root, spec, seed=3, piece_elems=PIECE, threads=THREADS, log=lambda *a: None)


def test_layout_keys_shapes_and_index(full):
    from lowvram.io.weights import discover

    spec, rep = full
    ckpt = discover(rep["ckpt_dir"])
    want = {k: s for k, (s, _) in dit_entries(spec).items()}
    assert len(want) == 1260
    assert ckpt.shapes() == want
    index = json.loads((ckpt.root / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"diffusion_pytorch_model-0000{i}-of-00004.safetensors"
                                                        for i in range(1, 5)]
    assert index["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in want.values())
    assert index["metadata"]["total_size"] == sum(ckpt.tensor_bytes().values())
    assert ckpt.dit_config() == spec.dit_config()  # the loader reads 25 wav2vec2 states off the weight's shape


def test_real_config_on_meta_device():
    """Without writing anything: 1260 keys, 16.30 B params, the released shard split, 448 LoRA targets."""
    spec = FullSpec.real()
    dit = dit_entries(spec)
    assert len(dit) == 1260 and sum(math.prod(s) for s, _ in dit.values()) == 16_295_755_609
    sizes = [sum(math.prod(dit[k][0]) * 2 for k in keys) / 1e9 for keys in dit_shards(dit, shard_bytes_for(spec, dit))]
    assert [round(s, 2) for s in sizes] == [9.97, 9.89, 9.96, 2.77]
    lora = lora_entries(spec, dit)
    assert len(lora) == 2 * 448 and sum(math.prod(s) for s, _ in lora.values()) == 676_331_520
    assert all(s[0] == 128 for k, (s, _) in lora.items() if ".lora_A." in k)
    files = {f["file"].rsplit("/", 1)[-1]: f for f in plan_files(spec)}
    t5 = files[T5_FILE]["entries"]
    assert sum(math.prod(s) for s, _ in t5.values()) == 5_680_910_336
    assert t5["token_embedding.weight"][0] == (256384, 4096)
    assert sum(math.prod(s) for s, _ in files[VAE_FILE]["entries"].values()) == 126_892_531
    assert sum(math.prod(s) for s, _ in files["model.safetensors"]["entries"].values()) == 315_472_545


def test_text_encoder_loads_and_encodes(full):
    from lowvram.model.text_encoder import load_text_encoder

    spec, rep = full
    enc = load_text_encoder(rep["ckpt_dir"], dtype=torch.float32, text_len=32)
    assert enc.model.config.vocab_size == 256384 and len(enc.tokenizer) == 256384
    prompt = "A woman with short dark hair talks to the camera, smiling; soft window light."
    ids = enc.tokenizer([prompt]).input_ids[0]
    assert max(ids) < 256384 and 2 not in ids  # no unknown pieces
    assert max(ids) > 256384 // 2  # pieces sit anywhere in the vocabulary
    out = enc.encode([prompt])[0]
    assert out.shape == (len(ids), T5_DIM) and torch.isfinite(out).all() and out.std() > 0.1


def test_pth_reads_back_exactly(full, tmp_path):
    """The streamed zip is what torch.save writes: same data.pkl bytes, mmap- and plainly loadable."""
    sd = {"a": torch.randn(3, 4).bfloat16(), "b.c": torch.randn(1000, 77), "e": torch.randn(33, 5).bfloat16()}
    entries = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    torch.save(sd, tmp_path / "ref.pth")
    with zipfile.ZipFile(tmp_path / "ref.pth") as z:
        assert z.read("ref/data.pkl") == pth_pickle(entries)
    w = PthStream(tmp_path / "ours.pth", entries)
    for k in w.order:
        raw = sd[k].reshape(-1).view(torch.uint8).numpy()
        w.write(k, [raw[:7], raw[7:]])  # bytes split at an odd offset
    w.close()
    for mmap in (True, False):
        back = torch.load(tmp_path / "ours.pth", mmap=mmap, weights_only=True)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    reader = torch._C.PyTorchFileReader(str(tmp_path / "ours.pth"))
    assert all(reader.get_record_offset(f"data/{i}") % 64 == 0 for i in range(3))

    spec, rep = full  # the written T5 file: every tensor the mapped load gives has the planned shape and dtype
    t5 = torch.load(f"{rep['ckpt_dir']}/{T5_FILE}", mmap=True, weights_only=True)
    plan = {f["file"].rsplit("/", 1)[-1]: f for f in plan_files(spec)}[T5_FILE]["entries"]
    assert {k: (tuple(v.shape), v.dtype) for k, v in t5.items()} == plan
    emb = t5["token_embedding.weight"].float()
    assert abs(emb.std().item() - 1.0) < 0.01 and abs(emb.mean().item()) < 0.01


def test_audio_encoder_vae_and_lora(full):
    from lowvram.io.lora import LoraSet
    from lowvram.io.weights import discover
    from lowvram.model.audio_encoder import load_audio_encoder
    from lowvram.model.vae import load_vae

    spec, rep = full
    ckpt = discover(rep["ckpt_dir"])
    enc = load_audio_encoder(ckpt.root)
    assert enc.num_hidden_states == 25
    h = enc.hidden_states(np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1)
    assert h.shape == (25, 24, 32) and torch.isfinite(h).all()
    vae = load_vae(ckpt.vae, dtype=torch.float32)
    z = vae.encode(torch.rand(1, 3, 1, 32, 48) * 2 - 1)
    assert z.shape == (1, 16, 1, 4, 6) and torch.isfinite(z).all()
    lora = LoraSet.load(rep["lora"])
    lora.check(ckpt.shapes())
    assert lora.summary() == {"targets": 448, "rank": 4, "alpha": 2.0, "scale": 0.5, "alpha_source": "metadata"}


def test_peak_rss_is_bounded(full):
    """While a tensor file is written, RSS grows by at most the random source's threads + 2 piece buffers
    (fp32-sized, allocated once and reused) plus 32 MiB of slack (zip/JSON bookkeeping, the allocator), far
    below the 131 MB T5 file that a torch.save-like writer would hold whole."""
    spec, rep = full
    assert rep["rss_reset"], "the kernel did not let the test reset VmHWM"
    bound = (THREADS + 2) * PIECE * 4 + (32 << 20)
    t5 = next(f for f in rep["files"] if f["file"].endswith(T5_FILE))
    assert t5["tensor_bytes"] > 3 * bound
    for f in rep["files"]:
        if "rss_before_bytes" in f:
            assert f["peak_rss_bytes"] - f["rss_before_bytes"] <= bound, f


def test_resume_keeps_written_files(full):
    spec, rep = full
    again = write_full(rep["root"], spec, seed=3, piece_elems=PIECE, threads=THREADS, resume=True, log=lambda *a: None)
    written = [f["file"] for f in rep["files"] if "rss_before_bytes" in f]
    assert len(written) == 8 and [f["file"] for f in again["files"] if f.get("skipped")] == written
    other = write_full(rep["root"], spec, seed=4, piece_elems=PIECE, resume=True, dry_run=True, log=lambda *a: None)
    assert not any(f.get("skipped") for f in other["files"])  # another seed means other bytes: nothing is kept


def test_photo_portrait_and_speech(tmp_path, monkeypatch):
    from PIL import Image

    from lowvram.demo import inputs
    from lowvram.io.media import load_audio

    inputs.photo_portrait(str(tmp_path / "a.png"), width=288, height=512, seed=4)
    inputs.photo_portrait(str(tmp_path / "b.png"), width=288, height=512, seed=4)
    a = np.asarray(Image.open(tmp_path / "a.png"), np.float32)
    assert a.shape == (512, 288, 3) and np.array_equal(a, np.asarray(Image.open(tmp_path / "b.png"), np.float32))
    face = a[170:230, 110:180]  # cheeks and nose: shaded skin, red above blue, no flat patches
    assert (face[..., 0] > face[..., 2] + 15).mean() > 0.9 and face.std(axis=(0, 1)).min() > 3
    assert np.abs(np.diff(a, axis=1)).mean() < 6  # smooth shading, not noise

    monkeypatch.setattr("shutil.which", lambda name: None)  # no espeak-ng: the synthetic voice, said so
    said = []
    info = inputs.speech_wav(str(tmp_path / "v.wav"), min_seconds=1.5, log=said.append)
    assert info["source"] == "synth_voice" and said and "espeak-ng" in said[0]
    assert load_audio(str(tmp_path / "v.wav")).shape[0] == 24000


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_espeak_speech_is_long_enough(tmp_path):
    import av

    from lowvram.demo.inputs import speech_wav

    info = speech_wav(str(tmp_path / "s.wav"), text="Hello there.", min_seconds=3.0)
    assert info["source"].startswith("espeak-ng") and info["seconds"] >= 3.0
    with av.open(str(tmp_path / "s.wav")) as c:
        s = c.streams.audio[0]
        assert (s.rate, s.channels) == (16000, 1)


def test_staged_source_gives_the_pool_bytes():
    """The GPU path's ring of staging buffers (run here on the CPU) yields exactly the thread pool's pieces."""
    from lowvram.demo.stream import Init, RandomSource

    pool, ring = RandomSource(7, piece_elems=1000, threads=2), RandomSource(7, piece_elems=1000, staged=True, ring=2)
    for dtype, numel in ((torch.bfloat16, 4321), (torch.float32, 999), (torch.bfloat16, 1)):
        a = [p.copy() for p in pool.pieces("t", numel, dtype, Init(0.5, 1.0))]
        b = [p.copy() for p in ring.pieces("t", numel, dtype, Init(0.5, 1.0))]
        assert [len(x) for x in a] == [len(x) for x in b] and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert sum(len(x) for x in a) == numel * dtype.itemsize
    x = torch.from_numpy(np.concatenate([p.copy() for p in pool.pieces("u", 100_000, torch.bfloat16, Init(0.5, 1.0))]))
    x = x.view(torch.bfloat16).float()
    assert abs(x.mean().item() - 1.0) < 0.01 and abs(x.std().item() - 0.5) < 0.01
    pool.close()


def test_user_path_reads_reports_and_mp4s(tmp_path, user_path):
    """The GPU driver's pieces that need no GPU: the --report summary (missing fields tolerated), the mp4
    check, the page-cache eviction and the tables."""
    from lowvram.io.video_writer import VideoWriter

    up = user_path
    rep = {"frames": 93, "clips": 2, "blocks": 8, "seconds": 12.0, "peak_vram": 20 * 2**30, "fps": 7.7,
           "phases": [{"name": "t5", "seconds": 9.5, "peak_allocated": 11 * 2**30, "peak_reserved": 12 * 2**30},
                      {"name": "first frame", "seconds": 31.0}, {"name": "clip 0", "seconds": 6.0},
                      {"name": "clip 1", "seconds": 5.0}],
           "plan": {"headline": "31/40 resident", "pinned_bytes": 7 << 30, "nested": {"x": 1}}}
    s = up.summarize_report(rep)
    assert s["ttff_s"] == 31.0 and s["steady_s_per_clip"] == 5.0 and s["pinned"] == {"pinned_bytes": 7 << 30}
    assert "nested" not in s["plan"] and up.summarize_report({}) == {}
    assert up.summarize_report({"clips": 2, "seconds": 10.0})["mean_s_per_clip"] == 5.0
    from lowvram.pipeline.options import RunResult  # the report `lowvram run --report` writes

    real = RunResult(tmp_path / "o.mp4", 237, 5, 20, 26.8, phases=rep["phases"][:1], plan={"batch": 4},
                     timings={"setup_s": 18.2, "first_frame_s": 25.1, "clip_s": [7.4, 4.4, 4.5, 4.3, 4.6]},
                     host={"peak_rss_bytes": 29 << 30, "pinned_bytes": 25 << 30}).to_dict()
    got = up.summarize_report(real)
    assert (got["ttff_s"], got["setup_s"], got["steady_s_per_clip"], got["peak_rss_bytes"]) == (25.1, 18.2, 4.45, 29 << 30)
    assert got["pinned"]["pinned_bytes"] == 25 << 30

    mp4 = tmp_path / "v.mp4"
    wave = np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 220).astype(np.float32) * 0.3
    with VideoWriter(str(mp4), 64, 48, fps=25, audio=wave) as w:
        w.write(np.zeros((30, 48, 64, 3), np.uint8))
    m = up.check_mp4(mp4)
    assert (m["frames"], m["fps"], m["video_s"]) == (30, 25.0, 1.2) and abs(m["av_diff_s"]) < 0.05
    assert up.check_mp4(tmp_path / "none.mp4") == {"error": "no file"}
    assert up.evict([mp4, tmp_path / "missing"]) == mp4.stat().st_size

    runs = {"stage": "run", "runs": [{"name": "4090-cold", "rc": 0, "wall_s": 50.0, "report": s, "mp4": m,
                                      "peak_rss_bytes": 30 << 30}, {"name": "12gb", "error": "no int8 dir"}]}
    text = up.table(runs)
    assert "| 4090-cold | 0 | 50.0 | 31.0 /" in text and "| t5 | 9.50 / 11.00 / 12.00 |" in text and "12gb" in text
