"""`lowvram quantize` under faults: a full disk (checked up front, simulated and real), what killed runs left,
--out naming an input, and a second run on the same --out."""

import hashlib
import os
import re
import subprocess
import sys
from collections import namedtuple

import pytest
from click.testing import CliRunner

from lowvram.demo.components import write_tiny_lora
from lowvram.demo.synthetic import dit_state_shapes, write_checkpoint
from lowvram.errors import LowvramError
from lowvram.io.locks import lock_output
from lowvram.model.config import DiTConfig
from lowvram.quantize import convert as convert_mod
from lowvram.quantize import outdir, shards
from lowvram.quantize.cli import quantize_cmd
from lowvram.quantize.convert import convert
from lowvram.quantize.format import detect_format

CONFIG = dict(dim=64, ffn_dim=96, freq_dim=16, num_heads=4, num_layers=2, text_dim=32, audio_dim=32,
              audio_inject_layers=[0, 1], num_audio_layers=5)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    shapes = dit_state_shapes(DiTConfig.from_dict(CONFIG))
    write_checkpoint(root / "ckpt", shapes, CONFIG, num_shards=2, seed=3)
    write_tiny_lora(root / "lora.safetensors", shapes, rank=4, seed=4)
    return root


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(*args):
    res = CliRunner().invoke(quantize_cmd, [str(a) for a in args])
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


def _left(folder, name="out"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}") or p.name == name)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- disk full

def test_too_little_free_space_is_refused_before_any_work(src, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 200_000, 200_000))
    code, lines = _run("--ckpt-dir", src / "ckpt", "--scheme", "int8", "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    need = convert_mod.planned_bytes(*_plan(src, "3GB"))
    assert f"needs {outdir.human_size(need)} and its disk has 200.0 kB free; " in lines[0]
    assert f"free {outdir.human_size(need - 200_000)} there or choose an --out on another disk" in lines[0]
    assert _left(tmp_path) == []


def test_enospc_mid_run_removes_the_staging_dir_and_names_the_size(src, tmp_path, enospc):
    before = _hashes(src)
    enospc(shards, "_pwrite", 300_000)  # the disk fills up inside the first shard
    code, lines = _run("--ckpt-dir", src / "ckpt", "--lora", src / "lora.safetensors", "--scheme", "int8",
                       "--out", tmp_path / "out", "--shard-size", "400KB")
    assert code == 2 and len(lines) == 1, lines
    msg = lines[0]
    assert msg.startswith("error: cannot write ") and "(No space left on device)" in msg
    need = convert_mod.planned_bytes(*_plan(src, "400KB"))
    assert f"the output needs {outdir.human_size(need)}" in msg
    assert "the partial output was removed" in msg and f"{src / 'ckpt'} is untouched" in msg
    assert _left(tmp_path) == []
    assert _hashes(src) == before


def _plan(src, shard_size):
    """The groups and metadata convert plans for int8 (to check the size it reports)."""
    wm, headers = convert_mod._read_sources(src / "ckpt")
    items = convert_mod._plan(wm, headers, "int8", ())
    groups = convert_mod._split(items, outdir.parse_bytes(shard_size))
    return groups, {"format": convert_mod.FORMAT_NAME, "version": convert_mod.FORMAT_VERSION, "scheme": "int8"}


def test_planned_size_is_what_is_written(src, tmp_path):
    groups, meta = _plan(src, "400KB")
    convert(src / "ckpt", tmp_path / "q", "int8", shard_size="400KB", progress=False)
    files = list((tmp_path / "q").iterdir())
    shard_bytes = sum(p.stat().st_size for p in files if p.name.endswith("-of-00003.safetensors"))
    assert len(groups) == 3 and shard_bytes == sum(
        shards.shard_file_size({k: v for i in g for k, v in i.outputs.items()}, meta) for g in groups)
    written = sum(p.stat().st_size for p in files)
    assert written <= convert_mod.planned_bytes(groups, meta) <= written + 65_536 + 400 * 200


def test_a_real_full_disk_up_front_and_mid_run(src, tmp_path, small_tmpfs, monkeypatch):
    before = _hashes(src)
    disk = small_tmpfs("512k")  # the output is about 0.9 MB
    code, lines = _run("--ckpt-dir", src / "ckpt", "--scheme", "int8", "--out", disk / "out")
    assert code == 2 and len(lines) == 1 and re.search(r"its disk has 5\d\d\.\d kB free", lines[0]), lines
    assert _left(disk) == []
    # the same disk filling up during the run (the up-front check is what would have caught it)
    monkeypatch.setattr(convert_mod, "check_free_space", lambda out, need: None)
    code, lines = _run("--ckpt-dir", src / "ckpt", "--scheme", "int8", "--out", disk / "out")
    assert code == 2 and len(lines) == 1 and "(No space left on device)" in lines[0], lines
    assert "the partial output was removed" in lines[0]
    assert _left(disk) == [] and _hashes(src) == before


# ---------------------------------------------------------------- what killed runs left

def test_stale_staging_dirs_are_removed_or_reported(src, tmp_path, capsys):
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".out.partial-{dead}", f".out.partial-{alive}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".other.partial-1").mkdir()  # another --out's: not ours to touch
    code, lines = _run("--ckpt-dir", src / "ckpt", "--scheme", "int8", "--out", tmp_path / "out")
    assert code == 0, lines
    text = " ".join(lines)
    assert f"removed {tmp_path / f'.out.partial-{dead}'}" in text and f"(process {dead})" in text
    assert f"belongs to process {alive}, which is running" in text and "rm -rf" in text
    assert _left(tmp_path) == sorted([f".out.partial-{alive}", "out"])
    assert (tmp_path / ".other.partial-1").is_dir()


def test_an_old_out_moved_aside_by_a_killed_run_is_restored(src, tmp_path):
    convert(src / "ckpt", tmp_path / "first", "int8", progress=False)
    dead = _dead_pid()
    aside = tmp_path / f".out.old-{dead}"
    (tmp_path / "first").rename(aside)  # killed between "move the old --out aside" and "put the new one in"
    notes = outdir.clean_stale_staging(tmp_path / "out")
    assert notes == [f"note: restored {tmp_path / 'out'} from {aside}, which a killed run had moved aside"]
    assert detect_format(tmp_path / "out").scheme == "int8" and not aside.exists()
    (tmp_path / f".out.old-{dead}").mkdir()  # with --out in place, a stale .old is only removed
    assert "removed" in outdir.clean_stale_staging(tmp_path / "out")[0]
    assert _left(tmp_path) == ["out"]


def test_a_second_quantize_on_the_same_out_refuses(src, tmp_path):
    with lock_output(tmp_path / "out"):  # as a run in progress holds it
        with pytest.raises(LowvramError, match="already being written by this process"):
            convert(src / "ckpt", tmp_path / "out", "int8", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- --out naming an input

def test_out_naming_an_input_is_refused(src, tmp_path):
    ckpt, lora = src / "ckpt", src / "lora.safetensors"
    before = _hashes(src)
    (tmp_path / "link").symlink_to(ckpt)
    cases = [
        (["--out", ckpt, "--force"], "is the same directory as the input --ckpt-dir"),
        (["--out", tmp_path / "link", "--force"], "is the same directory as the input --ckpt-dir"),
        (["--out", src, "--force"], "contains the input --ckpt-dir"),
        (["--lora", lora, "--out", lora], "is the same file as the input --lora"),
    ]
    for extra, match in cases:
        code, lines = _run("--ckpt-dir", ckpt, "--scheme", "int8", *extra)
        assert code == 2 and len(lines) == 1 and match in lines[0], (extra, lines)
    assert _hashes(src) == before
