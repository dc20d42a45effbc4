"""Checkpoint files that parse but hold the wrong things: one CheckpointError naming the file (and the key)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lowvram.constants import T5_FILE, TOKENIZER_DIR, WAV2VEC_DIR
from lowvram.demo.components import write_tiny_t5, write_tiny_wav2vec2
from lowvram.errors import CheckpointError
from lowvram.model.audio_encoder import load_audio_encoder
from lowvram.model.config import DiTConfig
from lowvram.model.text_encoder import load_text_encoder

GOOD = dict(dim=64, ffn_dim=96, freq_dim=16, num_heads=4, num_layers=2, audio_inject_layers=[0, 1])


# ---------------------------------------------------------------- config.json

@pytest.mark.parametrize("key,value,want", [
    ("dim", "5120", "an integer between 1 and"),
    ("num_heads", 0, "an integer between 1 and"),
    ("num_layers", 4.0, "an integer between 1 and"),
    ("ffn_dim", True, "an integer between 1 and"),
    ("text_len", 2**70, "an integer between 1 and"),
    ("eps", "1e-6", "a positive number"),
    ("eps", -1e-6, "a positive number"),
    ("patch_size", [1, 2], "a list of 3 positive integers"),
    ("patch_size", "122", "a list of 3 positive integers"),
    ("audio_inject_layers", [0, "4"], "a list of layer indices"),
    ("audio_inject_layers", 3, "a list of layer indices"),
    ("zero_timestep", "yes", "true or false"),
])
def test_config_value_of_the_wrong_type(tmp_path, key, value, want):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD, key: value}))
    with pytest.raises(CheckpointError) as e:
        DiTConfig.from_json(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: key '{key}' must be {want}") and "\n" not in msg
    assert "re-download config.json" in msg


def test_config_good_values_still_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD, "eps": 1e-6, "zero_timestep": False, "unknown_key": "ignored"}))
    cfg = DiTConfig.from_json(path)
    assert cfg.patch_size == (1, 2, 2) and cfg.audio_inject_layers == (0, 1) and cfg.zero_timestep is False
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- wav2vec2

@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("w2v")
    write_tiny_wav2vec2(d, seed=1)
    return d


def _w2v_copy(src, dst, name, content):
    shutil.copytree(src / WAV2VEC_DIR, dst / WAV2VEC_DIR)
    path = dst / WAV2VEC_DIR / name
    path.write_bytes(content)
    return dst, path


def _cfg(src, **edit):
    return json.dumps({**json.loads((src / WAV2VEC_DIR / "config.json").read_text()), **edit}).encode()


@pytest.mark.parametrize("case", ["config garbage", "config a list", "config wrong type", "config other model",
                                  "config fewer layers", "preprocessor garbage", "weights garbage",
                                  "weights of another model", "weights empty"])
def test_garbage_wav2vec2_folder_names_the_file(w2v, tmp_path, case):
    name, content, match = {
        "config garbage": ("config.json", b"\x00{{ not json", "is not valid JSON"),
        "config a list": ("config.json", b"[1, 2]", "holds a JSON list, not an object"),
        "config wrong type": ("config.json", _cfg(w2v, hidden_size="abc"), "does not hold a usable wav2vec2 setting"),
        "config other model": ("config.json", b"{}", "of other shapes than"),
        "config fewer layers": ("config.json", _cfg(w2v, num_hidden_layers=1), "has no place for"),
        "preprocessor garbage": ("preprocessor_config.json", b"garbage", "is not valid JSON"),
        "weights garbage": ("model.safetensors", os.urandom(4096), "not a safetensors file"),
        "weights of another model": ("model.safetensors", None, "lacks"),
        "weights empty": ("model.safetensors", b"", "is truncated"),
    }[case]
    if content is None:
        save_file({"foo": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
        content = (tmp_path / "other.safetensors").read_bytes()
    root, path = _w2v_copy(w2v, tmp_path / "ckpt", name, content)
    with pytest.raises(CheckpointError) as e:
        load_audio_encoder(root)
    msg = str(e.value)
    named = path if name != "config.json" or case in ("config garbage", "config a list", "config wrong type") \
        else root / WAV2VEC_DIR / "model.safetensors"
    assert str(named) in msg and match in msg and "\n" not in msg, msg


def test_loader_is_quiet(w2v, tmp_path, capfd):
    root, _ = _w2v_copy(w2v, tmp_path / "ckpt", "config.json", _cfg(w2v, num_hidden_layers=1))
    with pytest.raises(CheckpointError):
        load_audio_encoder(root)
    load_audio_encoder(w2v)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    write_tiny_t5(d, seed=1)
    return d


def _t5_copy(src, dst, name, content, drop=()):
    (dst / TOKENIZER_DIR).mkdir(parents=True)
    os.symlink(src / T5_FILE, dst / T5_FILE)
    for f in (src / TOKENIZER_DIR).iterdir():
        if f.name not in drop:
            (dst / TOKENIZER_DIR / f.name).write_bytes(f.read_bytes())
    path = dst / TOKENIZER_DIR / name
    if content is not None:
        path.write_bytes(content)
    return dst, path


@pytest.mark.parametrize("name,content,drop,match", [
    ("tokenizer.json", b"garbage\x00", (), "is not valid JSON"),
    ("tokenizer.json", b"{}", (), "is not a tokenizer"),
    ("tokenizer_config.json", b"[]", (), "holds a JSON list"),
    ("special_tokens_map.json", b"{oops", (), "is not valid JSON"),
    ("spiece.model", os.urandom(2000), ("tokenizer.json",), "does not load as a tokenizer"),
    ("tokenizer.json", None, ("tokenizer.json",), "holds neither tokenizer.json nor spiece.model"),
])
def test_garbage_tokenizer_folder_names_the_file(t5, tmp_path, name, content, drop, match):
    root, path = _t5_copy(t5, tmp_path / "ckpt", name, content, drop)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(root, dtype=torch.float32)
    msg = str(e.value)
    named = path if content is not None else root / TOKENIZER_DIR
    assert str(named) in msg and match in msg and "\n" not in msg, msg


def test_tokenizer_without_padding_token(t5, tmp_path):
    root, path = _t5_copy(t5, tmp_path / "ckpt", "special_tokens_map.json", b"{}")
    for name in ("tokenizer_config.json",):
        p = root / TOKENIZER_DIR / name
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "pad_token"}))
    with pytest.raises(CheckpointError, match="defines no padding token"):
        load_text_encoder(root, dtype=torch.float32)


# ---------------------------------------------------------------- third-party noise

def test_bitsandbytes_import_prints_nothing(tmp_path):
    code = "from lowvram.model.text_encoder import import_bitsandbytes; import_bitsandbytes()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
