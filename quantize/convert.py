"""`lowvram quantize`: stream a bf16 Wan2.2-S2V-14B checkpoint + LoRA into self-describing 8-bit shards.

One tensor at a time: read it from its source shard, merge its LoRA delta in fp32, quantize it per output
channel if it is one of the DiT's Linear weights (select.py), and write it at its planned offset in the output
shard (shards.py). Reading, the arithmetic and writing overlap on three threads, and the files are hashed on a
pool beside them (stream.py); host RAM holds a few layers, whatever the checkpoint size.

The arithmetic runs on `device`: a CUDA GPU when there is one ("auto"), else the CPU. Each tensor is read on
the host, moved to the GPU, merged, quantized and measured there, and only the 8-bit values and the scales
come back. What is and is not bit-identical between the two devices:
- tensors that are neither quantized nor LoRA targets never leave the host: the bytes as stored;
- the row quantizer (kernels/rowquant.py) gives the same codes and scales on both for the same input
  (tools/check_rowquant_gpu.py, tests/test_kernels_rowquant.py), so weights without a LoRA pair match exactly;
- the LoRA merge W + s * (B @ A) is fp32 on both (TF32 is turned off while converting), but cuBLAS sums the
  rank-r products in another order than the CPU's BLAS, so a merged element can differ in its last fp32 bits
  and so, after the cast to bf16, rarely by one bf16 ulp (at most 2^-7 relative). That moves its y = x / scale
  by less than one quantum; the same change to a row's absmax moves the row's scale by as much and every y of
  the row by less than one quantum. INT8 codes then differ by at most 1 (2 where both happen in one row),
  e4m3 codes (steps of at least 2^-4 relative) by at most one step;
- the SQNR in the manifest sums over the tensor in another order: its last digits can differ.
On the CPU the output is byte-identical to the serial converter's (`overlap=False`, tests/test_quantize_stream.py).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lowvram import __version__
from lowvram.errors import CheckpointError, LowvramError
from lowvram.io.lora import LoraSet, check_alpha
from lowvram.model.config import DiTConfig
from lowvram.pipeline.options import resolve_device
from lowvram.quantize.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_NAME,
    detect_format,
    read_index,
    write_stamp,
)
from lowvram.quantize.linear import SCHEMES, check_scheme, quantize_weight_sqnr
from lowvram.io.locks import lock_output
from lowvram.quantize.outdir import (
    DISK_ERRNOS,
    check_free_space,
    check_out_dir,
    clean_stale_staging,
    disk_error,
    link_components,
    parse_bytes,
    staged_dir,
)
from lowvram.quantize.select import natural_key, quantized_module
from lowvram.quantize.shards import NAME_DTYPES, ShardReader, ShardWriter, nbytes, read_header, shard_file_size
from lowvram.quantize.stream import BufferRing, Busy, Hashes, ReadAhead, WriteBehind

DEFAULT_SHARD_SIZE = "3GB"
AHEAD = 2  # source tensors read ahead of the one being converted, and converted ones waiting to be written


@dataclass
class _Item:
    """One source tensor and the output tensors it becomes."""
    key: str
    shard: str  # source shard file
    shape: tuple
    dtype: torch.dtype
    module: str | None  # set when quantized
    outputs: dict  # output name -> (shape, dtype)

    @property
    def out_bytes(self) -> int:
        return sum(nbytes(s, d) for s, d in self.outputs.values())


def peak_rss_bytes() -> int:
    """High-water resident set size of this process.

    Linux: VmHWM of /proc/self/status (ru_maxrss would carry the parent's peak over fork + exec).
    Elsewhere ru_maxrss (KiB, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _read_sources(ckpt_dir: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """weight_map and each source shard's header, with every key checked to be in its shard."""
    weight_map = read_index(ckpt_dir)
    if weight_map is None:
        raise CheckpointError(f"{ckpt_dir} has no {INDEX_FILE} (or diffusion_pytorch_model.safetensors); "
                              "--ckpt-dir must be the Wan2.2-S2V-14B directory")
    headers = {}
    for shard in sorted(set(weight_map.values())):
        path = ckpt_dir / shard
        if not path.is_file():
            raise CheckpointError(f"source shard {path} (listed in {INDEX_FILE}) is missing; re-download it")
        headers[shard] = read_header(path)
    for key, shard in weight_map.items():
        if key not in headers[shard]:
            raise CheckpointError(f"{INDEX_FILE} puts {key} in {shard}, which does not hold it; re-download the index")
    return weight_map, headers


def _plan(weight_map, headers, scheme: str, keep: tuple[str, ...]) -> list[_Item]:
    items = []
    for key in sorted(weight_map, key=natural_key):
        entry = headers[weight_map[key]][key]
        if entry["dtype"] not in NAME_DTYPES:
            raise CheckpointError(f"{weight_map[key]}: {key} has dtype {entry['dtype']}, which lowvram does not read")
        shape, dtype = tuple(entry["shape"]), NAME_DTYPES[entry["dtype"]]
        module = quantized_module(key, shape, keep)
        if module is None:
            outputs = {key: (shape, dtype)}
        else:
            outputs = {f"{module}.qweight": (shape, SCHEMES[scheme]), f"{module}.scale": ((shape[0],), torch.float32)}
        items.append(_Item(key, weight_map[key], shape, dtype, module, outputs))
    return items


def _split(items: list[_Item], shard_size: int) -> list[list[_Item]]:
    """Consecutive groups of at most shard_size output bytes (a larger single tensor gets its own shard)."""
    groups, cur, size = [], [], 0
    for item in items:
        if cur and size + item.out_bytes > shard_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item.out_bytes
    if cur:
        groups.append(cur)
    return groups


def _progress(console: Console | None, enabled: bool) -> Progress:
    """The bar on a terminal; nothing when the output is piped or logged (the summary line says it all)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console is not None and console.is_terminal))


def _convert_tensor(item: _Item, t: torch.Tensor, pair, lora: LoraSet | None, scheme: str, layers: dict,
                    device: torch.device) -> dict:
    """The output tensors of one source tensor t (on the host), on the host; records the layer's SQNR when
    quantized. pair: t's LoRA (A, B) or None. The arithmetic runs on `device`."""
    if item.module is None and pair is None:
        return {item.key: t}  # stored as read: never leaves the host
    w = t.to(device)  # [out, in]
    if pair is not None:
        w = lora.merge(item.key, w, pair)  # same dtype, fp32 merge
    if item.module is None:
        return {item.key: w.cpu()}
    q, scale, sqnr = quantize_weight_sqnr(w, scheme)
    layers[item.module] = {"scheme": scheme, "shape": list(item.shape), "sqnr_db": round(sqnr, 3),
                           "lora": pair is not None}
    return {f"{item.module}.qweight": q.cpu(), f"{item.module}.scale": scale.cpu()}  # .cpu(): waits for the GPU


def _write_all(writer: ShardWriter, tensors: dict) -> None:
    for name, tensor in tensors.items():
        writer.write(name, tensor)


@contextmanager
def _exact_fp32_matmul():
    """fp32 matmuls in full fp32 while converting: a caller that allowed TF32 (10 mantissa bits) would
    otherwise change the LoRA merge on a GPU far beyond the rounding order."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def planned_bytes(groups: list[list[_Item]], metadata: dict) -> int:
    """Bytes the output directory will take: the shards exactly, plus a bound for index/manifest/config."""
    shards = sum(shard_file_size({k: v for i in g for k, v in i.outputs.items()}, metadata) for g in groups)
    keys = sum(len(i.outputs) for g in groups for i in g)
    return shards + 65_536 + 400 * keys  # JSON files: ~100 B per index entry, ~250 B per manifest layer


def _convert_all(tmp: Path, bar: Progress, names: list[str], groups: list[list[_Item]], metadata: dict,
                 ckpt_dir: Path, lora_set: LoraSet | None, inputs: list[tuple[Path, str]], layers: dict,
                 device: torch.device, overlap: bool, busy: Busy) -> list[dict]:
    """Convert every tensor into the shards `names` under tmp (reader thread -> this thread -> writer thread)
    while the input files and then each finished shard are hashed; returns the shards' hash records, then the
    inputs'. On any error every thread is stopped and every file closed before it propagates."""
    items = [i for g in groups for i in g]
    hash_total = sum(p.stat().st_size for p, _ in inputs) + sum(
        shard_file_size({k: v for i in g for k, v in i.outputs.items()}, metadata) for g in groups)
    task = bar.add_task("quantizing", total=sum(nbytes(i.shape, i.dtype) for i in items),
                        count=f"0/{len(items)} tensors")
    hash_task = bar.add_task("hashing", total=hash_total, count=f"{len(inputs) + len(groups)} files")
    depth = AHEAD if overlap else 0
    workers = max(1, min(4, (os.cpu_count() or 1) // 4)) if overlap else 0  # sha256 runs ~1.5-2 GB/s a core
    hashes = Hashes(workers, on_bytes=lambda k: bar.update(hash_task, advance=k), busy=busy)
    input_records = [hashes.add(p, name) for p, name in inputs]  # read-only: hashed from the start
    readers = {shard: ShardReader(ckpt_dir / shard) for shard in sorted({i.shard for i in items})}
    # every source tensor is read into one of these: the one being converted, `depth` read ahead, and `depth`
    # waiting to be written (a tensor stored as read is written from its buffer), so the reader never waits
    # on a buffer that only it could free
    ring = BufferRing(2 * depth + 1, max(nbytes(i.shape, i.dtype) for i in items))
    writers: list[ShardWriter] = []
    shard_records: list = [None] * len(groups)
    order = [(gi, item) for gi, g in enumerate(groups) for item in g]

    def read(entry) -> tuple:  # on the reader thread
        item = entry[1]
        pair = lora_set.pair(item.key) if lora_set is not None else None
        buf = ring.take()
        try:
            return readers[item.shard].read(item.key, into=buf), pair, buf
        except BaseException:
            ring.give(buf)
            raise

    def write(writer: ShardWriter, tensors: dict, buf) -> None:  # on the writer thread
        _write_all(writer, tensors)
        if buf is not None:
            ring.give(buf)

    def finish(gi: int) -> None:  # on the writer thread, after the shard's last write
        writers[gi].close()
        shard_records[gi] = hashes.add(tmp / names[gi], names[gi])

    write = busy.timed("writing", write)
    convert_one = busy.timed("converting", _convert_tensor)
    reads, writes = ReadAhead(busy.timed("reading", read), order, depth), WriteBehind(depth)
    try:
        done = 0  # (no enumerate: it would hold the last source tensor while the next one is awaited)
        for (gi, item), (t, pair, buf) in reads:  # in natural-key order, `depth` read ahead
            if gi == len(writers):
                writers.append(ShardWriter(tmp / names[gi], {o: v for i in groups[gi] for o, v in i.outputs.items()},
                                           metadata))
            outputs = convert_one(item, t, pair, lora_set, metadata["scheme"], layers, device)
            as_read = outputs.get(item.key) is t  # written from the buffer: it comes back after the write
            if not as_read:
                ring.give(buf)  # t was copied to the GPU (synchronously) or converted into new tensors
            writes.submit(write, writers[gi], outputs, buf if as_read else None)
            del t, pair, buf, outputs
            if item is groups[gi][-1]:
                writes.submit(finish, gi)
            done += 1
            bar.update(task, advance=nbytes(item.shape, item.dtype), count=f"{done}/{len(items)} tensors")
        writes.wait()
        return [f.result() for f in shard_records] + [f.result() for f in input_records]
    except BaseException:
        ring.close()  # a read waiting for a buffer gives up
        reads.close()
        writes.close()  # before the hashes: the writer thread submits the hash of each shard it closes
        hashes.close(stop=True)
        raise
    finally:
        reads.close()
        writes.close()
        hashes.close()
        for w in writers:
            w.abort()  # closed already on success; on an error the staging directory is removed next
        for r in readers.values():
            r.close()


def _write_output(tmp: Path, bar: Progress, ckpt_dir: Path, lora: Path | None, lora_set: LoraSet | None,
                  groups: list[list[_Item]], headers: dict, metadata: dict, keep: tuple, shard_size: int,
                  device: torch.device, overlap: bool) -> dict:
    """Write the shards, index, config, component links and manifest into the staging directory `tmp`."""
    t0 = time.perf_counter()
    n = len(groups)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    source_names = [f for f in ["config.json", INDEX_FILE, *sorted(headers)] if (ckpt_dir / f).is_file()]
    inputs = [(ckpt_dir / f, f) for f in source_names] + ([(lora, lora.name)] if lora is not None else [])
    layers: dict[str, dict] = {}
    busy = Busy()
    records = _convert_all(tmp, bar, names, groups, metadata, ckpt_dir, lora_set, inputs, layers, device, overlap,
                           busy)
    shards, sources = records[:n], records[n:n + len(source_names)]
    out_map = {k: name for name, g in zip(names, groups) for i in g for k in i.outputs}
    index = {"metadata": {"total_size": sum(s["size"] for s in shards), **metadata},
             "weight_map": dict(sorted(out_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    shutil.copyfile(ckpt_dir / "config.json", tmp / "config.json")
    components = link_components(ckpt_dir, tmp)
    lora_rec = {**records[-1], **lora_set.summary()} if lora_set is not None else None
    # wall time of the conversion and what kept each thread busy (the pool's hashing summed over its threads)
    seconds = {"wall": round(time.perf_counter() - t0, 2), **{k: round(v, 2) for k, v in sorted(busy.seconds.items())}}
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "scheme": metadata["scheme"],
        "tool": {"name": "lowvram", "version": __version__, "torch": torch.__version__, "device": device.type},
        "sources": sources, "lora": lora_rec, "components": components, "keep_bf16": list(keep),
        "shard_size": shard_size, "peak_rss_bytes": peak_rss_bytes(), "seconds": seconds, "shards": shards,
        "layers": dict(sorted(layers.items(), key=lambda kv: natural_key(kv[0]))),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    # the shards were hashed here once closed: a run need not hash them again (renaming the directory keeps
    # each file's identity, which verified.json records)
    write_stamp(tmp, shards)
    return manifest


def convert(ckpt_dir, out, scheme: str, lora=None, keep_bf16=(), lora_alpha: float | None = None,
            force: bool = False, shard_size=DEFAULT_SHARD_SIZE, progress: bool = True,
            console: Console | None = None, device: str = "auto", overlap: bool = True) -> dict:
    """Convert a bf16 DiT checkpoint (+ optional LoRA) to a lowvram 8-bit directory; returns the manifest.

    scheme: "int8" or "fp8". keep_bf16: extra fnmatch patterns of module names left unquantized.
    shard_size: output shard budget ("3GB", "500MB" or bytes). device: where the merge, quantization and SQNR
    run: "auto" (a CUDA GPU when one is visible, else the CPU), "cpu", "cuda" or "cuda:N" (the module docstring
    says what may differ). overlap=False reads, converts, writes and hashes one step after the other on this
    thread: the reference the pipelined path is tested against.
    User errors raise LowvramError/CheckpointError before or during the run, and leave nothing at `out`: --out
    is checked against the inputs and the free space against the planned size before anything is written; it
    is locked against a second run; a disk that fills up anyway removes the staging directory and raises one
    line with the size the output needs (a source that cannot be read: one line saying what to do).
    """
    check_scheme(scheme)
    lora_alpha = check_alpha(lora_alpha)
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    lora = Path(lora) if lora is not None else None
    shard_size = parse_bytes(shard_size)
    keep = tuple(keep_bf16)
    dev = resolve_device(device, "auto")[0]
    console = console or Console(stderr=True)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"--ckpt-dir {ckpt_dir} is not a directory; pass the Wan2.2-S2V-14B checkpoint folder")
    check_out_dir(out, {"--ckpt-dir": ckpt_dir, "--lora": lora}, force)
    info = detect_format(ckpt_dir)
    if info is not None:
        raise LowvramError(f"{ckpt_dir} is already a lowvram {info.scheme} checkpoint; point --ckpt-dir at the "
                           "original bf16 Wan2.2-S2V-14B directory")
    DiTConfig.from_json(ckpt_dir / "config.json")
    weight_map, headers = _read_sources(ckpt_dir)
    lora_set = LoraSet.load(lora, alpha=lora_alpha) if lora is not None else None
    if lora_set is not None:
        lora_set.check({k: tuple(headers[s][k]["shape"]) for k, s in weight_map.items()})
    items = _plan(weight_map, headers, scheme, keep)
    groups = _split(items, shard_size)
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "scheme": scheme}

    need = planned_bytes(groups, metadata)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)  # the lock file lives there
    with lock_output(out):
        for note in clean_stale_staging(out):
            console.print(note, soft_wrap=True, markup=False, highlight=False)
        check_free_space(out, need)
        try:
            with staged_dir(out) as tmp, _progress(console, progress) as bar, _exact_fp32_matmul():
                manifest = _write_output(tmp, bar, ckpt_dir, lora, lora_set, groups, headers, metadata, keep,
                                         shard_size, dev, overlap)
        except OSError as e:
            if e.errno in DISK_ERRNOS:  # staged_dir has removed the staging directory
                raise disk_error(e, out, need, ckpt_dir) from None
            raise
    components, layers, shards = manifest["components"], manifest["layers"], manifest["shards"]
    missing = [k for k, how in components.items() if how == "missing"]
    if missing:
        console.print(f"note: {', '.join(missing)} not found in {ckpt_dir}; the output lacks them as well",
                      soft_wrap=True, markup=False, highlight=False)
    worst = min((v["sqnr_db"] for v in layers.values()), default=float("nan"))
    console.print(f"wrote {out}: {len(layers)} {scheme} layers (lowest weight SQNR {worst:.1f} dB), "
                  f"{len(shards)} shard(s), {sum(s['size'] for s in shards) / 1e9:.2f} GB, converted on {dev}; "
                  f"peak host RAM {manifest['peak_rss_bytes'] / 2**30:.2f} GiB", soft_wrap=True, markup=False,
                  highlight=False)
    return manifest
