"""`lowvram quantize` on its threads (quantize/stream.py) and on a device: the pipelined conversion writes the
same bytes as the serial one, errors on the reader thread end the run cleanly, --device is checked up front,
and on a GPU the output matches the CPU's up to the LoRA merge's rounding."""

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lowvram.errors import CheckpointError
from lowvram.quantize import convert as convert_mod
from lowvram.quantize import shards
from lowvram.quantize.cli import quantize_cmd
from lowvram.quantize.convert import convert
from lowvram.quantize.shards import ShardReader
from lowvram.quantize.stream import BufferRing, ReadAhead, WriteBehind


def _files(folder: Path) -> dict:
    """name -> bytes of every file but the manifest (whose peak RSS and seconds differ from run to run) and the
    verification stamp (each shard's inode and mtime)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "verified.json")}


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
    real_pwrite = shards._pwrite

    def slow_pwrite(fd, view, offset):  # the writer lags: reads run ahead into every buffer of the ring
        time.sleep(0.002)
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(shards, "_pwrite", slow_pwrite)
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


def test_a_closed_ring_stops_a_reader_waiting_for_a_buffer():
    ring = BufferRing(1, 16)
    buf = ring.take()
    waiting = ReadAhead(lambda i: ring.take(), range(3), depth=1)
    it = iter(waiting)
    ring.close()  # as the main thread does on an error, before it waits for the reader
    with pytest.raises(Exception, match="ring is closed"):
        next(it)
    waiting.close()
    ring.give(buf)


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
        def read(self, key, into=None):
            threads.add(threading.current_thread().name)
            if self.path == shard and shard.stat().st_size == (ckpt / shard.name).stat().st_size:
                os.truncate(shard, shard.stat().st_size - 1000)
            return super().read(key, into)

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


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_compare_outputs_counts_quanta(tiny_ckpt, tmp_path, scheme, user_path):
    """tools/user_path.py's comparison (the GPU check's): a directory against itself, then against a copy with
    one 8-bit code moved by 2 quanta (FP8: 2 steps along the e4m3 grid) and one scale changed."""
    from safetensors.torch import save_file

    ckpt, lora = tiny_ckpt
    up = user_path
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        convert(ckpt, out, scheme, lora=lora, progress=False, device="cpu")
    same = up.compare_outputs(a, b)
    assert same["tensors_differing"] == 0 and same["identical"] == same["tensors"] > 50 and same["codes_total"] > 0
    shard = next(b.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    q = tensors["blocks.0.ffn.0.qweight"].clone()
    codes = q.view(torch.int8)  # INT8: the value; e4m3: sign and magnitude bits, magnitude 0..126 finite
    step = 2 if codes[3, 5].abs() < 100 else -2
    codes[3, 5] = codes[3, 5] + (step if codes[3, 5] >= 0 else -step)
    s = tensors["blocks.0.ffn.0.scale"].clone()
    s[7] *= 1.01
    tensors.update({"blocks.0.ffn.0.qweight": q, "blocks.0.ffn.0.scale": s})
    save_file(tensors, str(shard), metadata=meta)
    diff = up.compare_outputs(a, b)
    assert diff["tensors_differing"] == 2 and diff["codes_differing"] == 1 and diff["max_quanta"] == 2, diff
    assert diff["scale_rows_differing"] == 1 and diff["max_scale_rel"] == pytest.approx(0.01, rel=1e-3)
    assert diff["other_tensors_differing"] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_cuda_conversion_matches_the_cpu_up_to_the_merge(tiny_ckpt, tmp_path, scheme, user_path):
    """On a GPU: weights without a LoRA pair and every unquantized tensor are bit-identical to the CPU's; a
    LoRA-merged weight's codes move by a quantum or two at most, its scales by at most a bf16 ulp of the absmax."""
    ckpt, lora = tiny_ckpt
    up = user_path
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    convert(ckpt, cpu, scheme, lora=lora, progress=False, device="cpu")
    man = convert(ckpt, gpu, scheme, lora=lora, progress=False, device="cuda")
    assert man["tool"]["device"] == "cuda"
    cmp = up.compare_outputs(cpu, gpu)
    assert cmp["only_in_one"] == [] and cmp["other_tensors_differing"] == 0, cmp
    # one bf16 ulp (<= 2^-7 relative) of a merged element moves its y = x / scale by < 1, of the row's absmax the
    # scale by <= 2^-7 and every y of the row by < 1: INT8 codes by at most 2 with both, e4m3 (steps >= 2^-4) by 1
    assert cmp["max_quanta"] <= (2 if scheme == "int8" else 1) and cmp["max_scale_rel"] <= 2.0 ** -7, cmp
    assert cmp["codes_differing"] <= 0.01 * cmp["codes_total"], cmp
    no_lora = {f"{m}.qweight" for m, v in man["layers"].items() if not v["lora"]}
    assert no_lora and not no_lora & {r["key"] for r in cmp["differing"]}, cmp
    cpu_layers = json.loads((cpu / "manifest.json").read_text())["layers"]
    for name, layer in man["layers"].items():
        assert layer["sqnr_db"] == pytest.approx(cpu_layers[name]["sqnr_db"], abs=0.01)
