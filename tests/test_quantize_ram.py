"""The converter streams: converting a ~1 GiB checkpoint stays far below the size of the checkpoint in RAM."""

import json
import subprocess
import sys

import pytest

from lowvram.demo.components import write_tiny_lora
from lowvram.demo.synthetic import write_checkpoint

DIM, FFN, LAYERS = 4096, 8192, 8  # 16 tensors of 64 MiB bf16 = 1 GiB in 2 source shards
SHARD = 256 * 2**20
MiB = 2**20

SCRIPT = """
import json, sys
from lowvram.quantize.convert import convert, peak_rss_bytes
base = peak_rss_bytes()
convert(sys.argv[1], sys.argv[2], "int8", lora=sys.argv[3], shard_size=int(sys.argv[4]), progress=False)
print(json.dumps({"base": base, "peak": peak_rss_bytes()}))
"""


@pytest.mark.slow
def test_peak_rss_of_a_1gib_conversion(tmp_path):
    shapes = {}
    for i in range(LAYERS):
        shapes[f"blocks.{i}.ffn.0.weight"] = (FFN, DIM)
        shapes[f"blocks.{i}.ffn.2.weight"] = (DIM, FFN)
    config = {"dim": DIM, "ffn_dim": FFN, "freq_dim": 256, "num_heads": 32, "num_layers": LAYERS,
              "audio_inject_layers": [0]}
    write_checkpoint(tmp_path / "ckpt", shapes, config, num_shards=2, seed=0)
    write_tiny_lora(tmp_path / "lora.safetensors", shapes, rank=8, seed=1)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "out"),
                          str(tmp_path / "lora.safetensors"), str(SHARD)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    grown = (rss["peak"] - rss["base"]) / MiB
    print(f"baseline {rss['base'] / MiB:.0f} MiB, peak {rss['peak'] / MiB:.0f} MiB, grown {grown:.0f} MiB")
    assert "peak host RAM" in res.stderr  # printed at the end of every conversion
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and len(manifest["layers"]) == 16
    # the target (BENCHMARKS.md §2): one output shard + 3 GB
    assert rss["peak"] < SHARD + 3 * 10**9
    # streaming: the growth is a few layer-sized buffers, below the 1 GiB checkpoint. Measured here: 410-445
    # MiB with the serial converter (a mapped source tensor, merged, quantized, scratch); 445-800 MiB since
    # the conversion is pipelined (quantize/stream.py): two 64 MiB source tensors read ahead and two 32 MiB
    # results waiting to be written, ~200 MiB, plus glibc heap the main thread's arena keeps when the
    # threads' allocations interleave (0-350 MiB from run to run; MALLOC_MMAP_THRESHOLD_=1048576 removes it,
    # at the price of page faults on every 16 MiB scratch block of the CPU path)
    assert grown < 1024
