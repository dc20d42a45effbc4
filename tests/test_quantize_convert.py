"""`lowvram quantize` on a tiny synthetic checkpoint with the real key names: output, runtime side, bad input."""

import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors import safe_open

from lowvram.demo.components import write_tiny_lora
from lowvram.demo.synthetic import dit_state_shapes, write_checkpoint
from lowvram.errors import CheckpointError
from lowvram.io.lora import LoraSet
from lowvram.metrics import sqnr_db
from lowvram.model.config import DiTConfig
from lowvram.quantize.cli import quantize_cmd
from lowvram.quantize.convert import convert
from lowvram.quantize.format import detect_format, quantized_module_names, verify_manifest
from lowvram.quantize.linear import apply_quant_layers, dequantize_weight

CONFIG = dict(dim=64, ffn_dim=96, freq_dim=16, num_heads=4, num_layers=2, text_dim=32, audio_dim=32,
              audio_inject_layers=[0, 1], num_audio_layers=5)
N_QUANT = 2 * 10 + 2 * 4 + 2  # per block q,k,v,o x2 + ffn.0/2; injector q,k,v,o; adain linear


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    shapes = dit_state_shapes(DiTConfig.from_dict(CONFIG))
    write_checkpoint(root / "ckpt", shapes, CONFIG, num_shards=2, seed=3)
    write_tiny_lora(root / "lora.safetensors", shapes, rank=4, seed=4)
    (root / "ckpt" / "Wan2.1_VAE.pth").write_bytes(os.urandom(1000))
    (root / "ckpt" / "google" / "umt5-xxl").mkdir(parents=True)
    (root / "ckpt" / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def int8_out(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    manifest = convert(src / "ckpt", out, "int8", lora=src / "lora.safetensors", shard_size="120KB", progress=False)
    return out, manifest


def _tensors(ckpt):
    index = json.loads((ckpt / "diffusion_pytorch_model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_int8_output_layout_and_values(src, int8_out):
    out, manifest = int8_out
    source, got = _tensors(src / "ckpt"), _tensors(out)
    lora = LoraSet.load(src / "lora.safetensors")
    mods = quantized_module_names(out)
    assert len(mods) == N_QUANT and set(mods.values()) == {"int8"}
    assert "audio_injector.injector_adain_layers.1.linear" in mods and "text_embedding.2" not in mods
    assert "casual_audio_encoder.encoder.final_linear" not in mods and "time_projection.1" not in mods
    for key, t in source.items():
        mod = key[: -len(".weight")]
        if mod in mods:
            q, s = got[f"{mod}.qweight"], got[f"{mod}.scale"]
            assert q.dtype == torch.int8 and s.dtype == torch.float32 and f"{mod}.weight" not in got
            merged = lora.merge(key, t).float()
            err = (dequantize_weight(q, s) - merged).abs()
            assert (err <= s[:, None] * 0.5 + 1e-6).all()  # LoRA merged, then rounded to nearest
            assert manifest["layers"][mod]["sqnr_db"] == pytest.approx(sqnr_db(merged, dequantize_weight(q, s)),
                                                                        abs=1e-3)
        else:
            assert torch.equal(got[key], t) and got[key].dtype == t.dtype  # kept as stored (bf16)
    assert min(v["sqnr_db"] for v in manifest["layers"].values()) > 40.0
    assert len(manifest["shards"]) >= 3 and manifest["lora"]["scale"] == 0.5 and manifest["lora"]["rank"] == 4
    assert manifest["lora"]["sha256"] == _sha(src / "lora.safetensors")
    assert {s["file"] for s in manifest["sources"]} >= {"config.json", "diffusion_pytorch_model-00001-of-00002.safetensors"}
    assert manifest["peak_rss_bytes"] > 0 and manifest["tool"]["name"] == "lowvram"
    with safe_open(str(out / manifest["shards"][0]["file"]), "pt") as f:
        assert f.metadata() == {"format": "lowvram", "version": "1", "scheme": "int8"}
    assert (out / "config.json").read_bytes() == (src / "ckpt" / "config.json").read_bytes()
    assert os.path.samefile(out / "Wan2.1_VAE.pth", src / "ckpt" / "Wan2.1_VAE.pth")  # linked, not copied
    assert (out / "google" / "umt5-xxl" / "tokenizer.json").read_text() == "{}"
    assert manifest["components"]["wav2vec2-large-xlsr-53-english"] == "missing"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_runtime_side_loads_and_runs(int8_out, src):
    out, _ = int8_out
    info = detect_format(out)
    assert info.scheme == "int8" and info.version == "1" and len(info.shards) >= 3
    assert detect_format(src / "ckpt") is None
    assert verify_manifest(out)["scheme"] == "int8"
    got = _tensors(out)
    mods = quantized_module_names(out)
    # a module tree with the checkpoint's Linear names, swapped on meta and assigned from the shards
    with torch.device("meta"):
        model = nn.Module()
        for name in mods:
            parent = model
            *path, leaf = name.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            out_f, in_f = got[f"{name}.qweight"].shape
            parent.add_module(leaf, nn.Linear(in_f, out_f, dtype=torch.bfloat16))
    apply_quant_layers(model, mods)
    sd = {k: v for k, v in got.items() if k.rpartition(".")[0] in mods}
    model.load_state_dict(sd, assign=True, strict=True)
    lin = model.get_submodule("blocks.1.ffn.0")
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = nn.functional.linear(x.float(), dequantize_weight(lin.qweight, lin.scale), lin.bias.float())
    assert lin(x).shape == (3, 11, 96) and sqnr_db(ref, lin(x)) > 40.0


def test_fp8_determinism_and_keep_bf16(src, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        convert(src / "ckpt", out, "fp8", lora=src / "lora.safetensors", keep_bf16=["blocks.1.*"],
                shard_size="200KB", progress=False)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("*.safetensors")) and len(shards) >= 2
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    mods = quantized_module_names(a)
    assert set(mods.values()) == {"fp8"} and len(mods) == N_QUANT - 10
    assert not any(m.startswith("blocks.1.") for m in mods)
    got = _tensors(a)
    assert got["blocks.0.self_attn.q.qweight"].dtype == torch.float8_e4m3fn
    # kept in bf16 but still a LoRA target: merged
    lora = LoraSet.load(src / "lora.safetensors")
    w = _tensors(src / "ckpt")["blocks.1.ffn.2.weight"]
    assert torch.equal(got["blocks.1.ffn.2.weight"], lora.merge("blocks.1.ffn.2.weight", w))


def _run(*args):
    res = CliRunner().invoke(quantize_cmd, [str(a) for a in args])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    return res.exit_code, lines


def test_cli_converts_and_refuses_a_quantized_dir(src, tmp_path):
    out = tmp_path / "o"
    code, lines = _run("--ckpt-dir", src / "ckpt", "--lora", src / "lora.safetensors", "--scheme", "int8",
                       "--out", out, "--shard-size", "1MB")
    assert code == 0 and "peak host RAM" in " ".join(lines)
    assert detect_format(out).scheme == "int8"
    code, lines = _run("--ckpt-dir", out, "--scheme", "fp8", "--out", tmp_path / "again")
    assert code == 2 and len(lines) == 1 and "already a lowvram int8 checkpoint" in lines[0]
    assert not (tmp_path / "again").exists()
    # --force replaces a non-empty output
    code, _ = _run("--ckpt-dir", src / "ckpt", "--scheme", "fp8", "--out", out, "--force")
    assert code == 0 and detect_format(out).scheme == "fp8"


def _assert_clean_failure(tmp_path, args, match):
    out = tmp_path / "out"
    code, lines = _run(*args, "--out", out)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_scheme_and_nonempty_out(src, tmp_path):
    _assert_clean_failure(tmp_path, ["--ckpt-dir", src / "ckpt", "--scheme", "int4"], "unknown quantization scheme")
    _assert_clean_failure(tmp_path, ["--ckpt-dir", src / "ckpt", "--scheme", "int8", "--shard-size", "lots"],
                          "cannot read the size")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    code, lines = _run("--ckpt-dir", src / "ckpt", "--scheme", "int8", "--out", busy)
    assert code == 2 and len(lines) == 1 and "--force" in lines[0] and (busy / "x").read_text() == "keep me"


def test_truncated_source_shard(src, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src / "ckpt", ckpt)
    shard = ckpt / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _assert_clean_failure(tmp_path, ["--ckpt-dir", ckpt, "--scheme", "int8"], "is truncated")


def test_lora_that_does_not_fit(src, tmp_path):
    shapes = dit_state_shapes(DiTConfig.from_dict({**CONFIG, "dim": 32, "ffn_dim": 48}))
    write_tiny_lora(tmp_path / "other.safetensors", shapes)
    _assert_clean_failure(tmp_path, ["--ckpt-dir", src / "ckpt", "--lora", tmp_path / "other.safetensors",
                                     "--scheme", "int8"], "does not fit")
    shapes = dit_state_shapes(DiTConfig.from_dict({**CONFIG, "num_layers": 3, "audio_inject_layers": [0, 2]}))
    write_tiny_lora(tmp_path / "deeper.safetensors", shapes)
    _assert_clean_failure(tmp_path, ["--ckpt-dir", src / "ckpt", "--lora", tmp_path / "deeper.safetensors",
                                     "--scheme", "int8"], "blocks.2.")


def test_damaged_quantized_dir(int8_out, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(int8_out[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match its SHA-256"):
        verify_manifest(out)
    verify_manifest(out, verify_hashes=False)  # same size: only the hash tells
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(CheckpointError, match=f"{shard.name} has {len(data) - 1} bytes"):
        verify_manifest(out, verify_hashes=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        verify_manifest(out)
    manifest["version"] = "2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version '2'"):
        verify_manifest(out)


def test_unknown_version_in_shard_metadata(int8_out, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(int8_out[0], out)
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["file"]
    data = shard.read_bytes()
    assert data.count(b'"version":"1"') == 1
    shard.write_bytes(data.replace(b'"version":"1"', b'"version":"9"'))  # same length: header stays valid
    with pytest.raises(CheckpointError, match="version '9'"):
        detect_format(out)
    code, lines = _run("--ckpt-dir", out, "--scheme", "int8", "--out", tmp_path / "x")
    assert code == 2 and len(lines) == 1 and "version '9'" in lines[0]


def test_verified_shards_are_not_hashed_again_until_they_change(int8_out, tmp_path, monkeypatch):
    from lowvram.quantize import format as fmt

    out = tmp_path / "q"
    shutil.copytree(int8_out[0], out)
    hashed = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(e["file"] for e in manifest["shards"])
    verify_manifest(int8_out[0])
    assert hashed == []  # the converter's own stamp: a fresh output is not hashed again by its first run
    verify_manifest(out)
    assert sorted(hashed) == names and (out / fmt.STAMP_NAME).is_file()  # copied files: new inodes, all hashed
    hashed.clear()
    verify_manifest(out)
    assert hashed == []  # unchanged since they matched: the stamp answers
    shard = out / names[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    st = shard.stat()
    shard.write_bytes(bytes(data))  # same size, rewritten in place
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match its SHA-256"):
        verify_manifest(out)
    assert hashed == [shard.name]  # only the changed shard was read again
    (out / fmt.STAMP_NAME).write_text("not json")
    hashed.clear()
    with pytest.raises(CheckpointError, match="does not match"):
        verify_manifest(out)  # an unreadable stamp means: hash everything
    assert sorted(hashed) == names
