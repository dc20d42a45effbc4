"""`lowvram quantize` on its threads (quantize/stream.py) and on a device: the pipelined conversion writes the
same bytes as the serial one, errors on the reader thread end the run cleanly, --device is checked up front."""

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lowvram.errors import CheckpointError
from lowvram.quantize import convert as convert_mod
from lowvram.quantize.cli import quantize_cmd
from lowvram.quantize.convert import convert
from lowvram.quantize.shards import ShardReader
from lowvram.quantize.stream import ReadAhead, WriteBehind


def _files(folder: Path) -> dict:
    """name -> bytes of every file but the manifest (whose peak RSS and seconds differ from run to run)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(folder: Path) -> dict:
    """The manifest less what differs from run to run: peak RSS and the seconds."""
    m = json.loads((folder / "manifest.json").read_text())
    assert m.pop("peak_rss_bytes") > 0
    seconds = m.pop("seconds")
    assert set(seconds) == {"wall", "reading", "converting", "writing", "hashing"} and seconds["wall"] > 0
    return m


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_pipelined_conversion_writes_the_serial_bytes(tiny_ckpt, tmp_path, scheme, monkeypatch):
    ckpt, lora = tiny_ckpt
    monkeypatch.setattr(convert_mod, "AHEAD", 3)  # deeper than the tiny shards: reads and writes cross them
    outs = {}
    for overlap in (False, True):
        out = tmp_path / f"{scheme}-{overlap}"
        # small shards and a kept-bf16 block: shard boundaries, merged bf16 weights and pass-through tensors
        convert(ckpt, out, scheme, lora=lora, shard_size="40KB", keep_bf16=["blocks.1.*"], progress=False,
                device="cpu", overlap=overlap)
        outs[overlap] = out
    serial, pipelined = _files(outs[False]), _files(outs[True])
    assert len([n for n in serial if n.endswith(".safetensors")]) >= 10
    assert serial.keys() == pipelined.keys()
    assert [n for n in serial if serial[n] != pipelined[n]] == []
    m_serial, m_pipelined = _manifest(outs[False]), _manifest(outs[True])
    assert m_serial == m_pipelined and m_serial["tool"]["device"] == "cpu"
    # the hashes made on the pool are the files' hashes
    for rec in m_pipelined["shards"]:
        assert rec["sha256"] == hashlib.sha256((outs[True] / rec["file"]).read_bytes()).hexdigest()
    for rec in m_pipelined["sources"]:
        assert rec["sha256"] == hashlib.sha256((ckpt / rec["file"]).read_bytes()).hexdigest()
    assert m_pipelined["lora"]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()


def test_shard_reader_reads_what_safetensors_reads(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    shards = sorted(ckpt.glob("diffusion_pytorch_model-*.safetensors"))
    for shard in shards:
        reader = ShardReader(shard)
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                got, want = reader.read(key), f.get_tensor(key)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key
        reader.close()
    copy = tmp_path / shards[0].name
    copy.write_bytes(shards[0].read_bytes())
    reader = ShardReader(copy)
    last = max((k for k in reader.header if k != "__metadata__"), key=lambda k: reader.header[k]["data_offsets"][1])
    os.truncate(copy, copy.stat().st_size - 10)  # shortened after the header was checked
    with pytest.raises(CheckpointError, match=f"{copy} is truncated: {last} ends at byte"):
        reader.read(last)
    reader.close()


def test_read_ahead_and_write_behind_keep_order_and_raise_errors():
    seen = []
    reads = ReadAhead(lambda i: i * i, range(7), depth=2)
    assert list(reads) == [(i, i * i) for i in range(7)]
    reads.close()
    writes = WriteBehind(depth=2)
    for i in range(20):
        writes.submit(seen.append, i)
    writes.wait()
    assert seen == list(range(20))

    def boom(i):
        if i == 3:
            raise OSError(5, "Input/output error")
        return i

    reads = ReadAhead(boom, range(10), depth=2)
    got = []
    with pytest.raises(OSError, match="Input/output"):
        for i, _ in reads:
            got.append(i)
    reads.close()
    assert got == [0, 1, 2]  # raised at its own item, after the ones before it
    writes = WriteBehind(depth=1)
    writes.submit(boom, 3)
    with pytest.raises(OSError):
        writes.submit(boom, 4)  # the next hand-off raises the first error
    writes.close()


def _run(*args):
    res = CliRunner().invoke(quantize_cmd, [str(a) for a in args])
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


def _nothing_left(folder: Path, name: str = "out") -> bool:
    return not [p for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}")]


def test_a_shard_truncated_mid_run_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, lora = tiny_ckpt
    src = tmp_path / "ckpt"
    src.mkdir()
    for p in ckpt.iterdir():
        if p.is_file():
            (src / p.name).write_bytes(p.read_bytes())
    shard = src / "diffusion_pytorch_model-00002-of-00002.safetensors"
    threads = set()

    class ShortensOnFirstRead(ShardReader):  # the up-front checks pass; the shard then shrinks under the reader
        def read(self, key):
            threads.add(threading.current_thread().name)
            if self.path == shard and shard.stat().st_size == (ckpt / shard.name).stat().st_size:
                os.truncate(shard, shard.stat().st_size - 1000)
            return super().read(key)

    monkeypatch.setattr(convert_mod, "ShardReader", ShortensOnFirstRead)
    code, lines = _run("--ckpt-dir", src, "--lora", lora, "--scheme", "int8", "--out", tmp_path / "out",
                       "--device", "cpu", "--shard-size", "40KB")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {shard} is truncated: ") and "ends at byte" in lines[0], lines
    assert lines[0].endswith("re-download the shard")
    assert threads == {"lowvram-read_0"}  # read on the reader thread, raised on the main one
    assert _nothing_left(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_is_refused_up_front(tiny_ckpt, tmp_path):
    ckpt, lora = tiny_ckpt
    code, lines = _run("--ckpt-dir", ckpt, "--lora", lora, "--scheme", "int8", "--out", tmp_path / "out",
                       "--device", "cuda")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == "error: --device cuda was asked for but no CUDA GPU is visible; use --device cpu"
    code, lines = _run("--ckpt-dir", ckpt, "--scheme", "int8", "--out", tmp_path / "out", "--device", "tpu")
    assert code == 2 and len(lines) == 1 and "--device 'tpu'" in lines[0], lines
    assert _nothing_left(tmp_path)
    code, lines = _run("--ckpt-dir", ckpt, "--scheme", "int8", "--out", tmp_path / "out")  # auto: the CPU
    assert code == 0 and "converted on cpu" in lines[-1], lines
