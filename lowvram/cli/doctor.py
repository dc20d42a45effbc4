"""`lowvram doctor`: what this machine has (versions, GPUs, RAM, pinned-memory limit) and, for a
checkpoint directory, which files are present, readable and of the expected size.

`doctor_report(ckpt_dir)` sorts what it finds in two: problems, which make `lowvram run` fail or
produce a wrong video (a missing, unreadable, truncated or mismatched checkpoint file), and warnings,
which only make it slower or smaller (no GPU, no Triton, a low pinned-memory limit, little host RAM).
The command exits with `DoctorReport.exit_code`: 1 when there is a problem, else 0.
"""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from lowvram.constants import GIB
from lowvram.errors import CheckpointError

# sizes of the real files (docs/model.md §2.1), for a warning when a file is far off (truncated download)
EXPECTED_BYTES = {"models_t5_umt5-xxl-enc-bf16.pth": 11.36e9, "Wan2.1_VAE.pth": 0.508e9}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


def kernel_status(cuda: bool, triton_version: str) -> tuple[tuple[str, str], str | None]:
    """The row saying which kernels `lowvram run` will use, and a problem when a GPU runs without Triton."""
    if not cuda:
        return ("kernels", "torch (CPU)"), None
    if triton_version == "not installed":
        return ("kernels", "torch only"), (
            "Triton is not installed: the GPU falls back to torch._int_mm with eager activation quantization and "
            "eager norms/modulation (2.3x slower all resident, measured on an H200); `pip install triton`")
    return ("kernels", "Triton: fused W8A8 GEMMs and row kernels"), None


# the optional attention libraries: backend -> (distribution, what `lowvram doctor` says of it where it runs)
LIBRARY_NOTES = {"sage": ("sageattention", "auto does not take it: slower end to end on the H100, BENCHMARKS.md §3"),
                 "fa4": ("flash-attn-4", "exact bf16; auto does not take it: 1.18x cuDNN alone, under 1% end to end "
                                         "on the H100, BENCHMARKS.md §3")}


def library_status(cuda: bool, backend: str) -> tuple[str, str]:
    """The row saying whether `--attention <backend>` (an optional library, model.attention.LIBRARIES) can run on
    this machine, and if not why."""
    from importlib.metadata import PackageNotFoundError, version

    from lowvram.model.attention import library_module

    dist, note = LIBRARY_NOTES[backend]
    if not cuda:
        return dist, "not used on the CPU"
    why = library_module(backend).unavailable()
    if why is not None:
        return dist, f"not used ({why})"
    try:
        ver = version(dist)
    except PackageNotFoundError:  # imported from a source tree (tools/build_sage.py)
        ver = "from source"
    return dist, f"{ver}: --attention {backend} runs it on this GPU ({note})"


def machine_report() -> tuple[list[tuple[str, str]], list[str]]:
    """(facts, warnings) about this machine; none of them stops `lowvram run`."""
    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("triton", _version("triton")), ("transformers", _version("transformers")),
            ("CUDA (torch build)", str(torch.version.cuda))]
    problems = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / GIB:.1f} GiB, sm_{p.major}{p.minor}"))
    else:
        rows.append(("GPU", "none visible"))
        problems.append("no CUDA GPU: `lowvram run` will use the CPU (fine for `lowvram demo`, far too slow for the "
                        "real model); install a CUDA build of torch and a driver")
    row, problem = kernel_status(torch.cuda.is_available(), _version("triton"))
    rows += [row] + [library_status(torch.cuda.is_available(), b) for b in LIBRARY_NOTES]
    problems += [problem] if problem else []
    vm = psutil.virtual_memory()
    rows.append(("host RAM", f"{vm.total / GIB:.1f} GiB total, {vm.available / GIB:.1f} GiB available"))
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    rows.append(("pinned-memory limit (ulimit -l)", "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / GIB:.2f} GiB"))
    if soft != resource.RLIM_INFINITY and soft < 8 * GIB:
        problems.append("ulimit -l is below 8 GiB: host KV caches and streamed blocks fall back to pageable memory "
                        "(~5x slower copies); raise it with `ulimit -l unlimited` or in /etc/security/limits.conf")
    if vm.total < 48 * GIB:
        problems.append(f"{vm.total / GIB:.0f} GiB of host RAM: the 24 GB profiles keep ~21 GB of KV cache in host "
                        "memory; 64 GiB is comfortable")
    return rows, problems


@dataclass
class DoctorReport:
    rows: list[tuple[str, str]] = field(default_factory=list)  # (what, value) facts
    problems: list[str] = field(default_factory=list)  # `lowvram run` would fail or be wrong
    warnings: list[str] = field(default_factory=list)  # it runs, slower or smaller

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def lines(self) -> list[str]:
        """What the command prints: the facts aligned, then each problem and warning, then a verdict."""
        width = max((len(k) for k, _ in self.rows), default=0)
        out = [f"{k:<{width}}  {v}" for k, v in self.rows]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"warning: {w}" for w in self.warnings]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s): `lowvram run` would fail or be wrong until they are fixed")
        else:
            out.append("no problems found" + (f" ({len(self.warnings)} warning(s))" if self.warnings else ""))
        return out


def doctor_report(ckpt_dir=None) -> DoctorReport:
    """The machine's facts and warnings and, with ckpt_dir, the checkpoint's files and problems."""
    rows, warnings = machine_report()
    problems: list[str] = []
    if ckpt_dir is not None:
        r, problems = checkpoint_report(ckpt_dir)
        rows = rows + r
    return DoctorReport(rows, problems, warnings)


def _folder_problems(ckpt) -> list[str]:
    """The small files of the wav2vec2 and tokenizer folders, checked as the loaders check them (cheap: the
    tokenizer is loaded, wav2vec2's JSON files and weight header are read, no model is built)."""
    from lowvram.io.hf_folders import check_json_files
    from lowvram.model.audio_encoder import WEIGHT_FILES
    from lowvram.model.text_encoder import load_tokenizer
    from lowvram.quantize.shards import read_header

    problems = []
    try:
        check_json_files(ckpt.wav2vec, f"the {ckpt.wav2vec.name} folder")
        weights = next((ckpt.wav2vec / n for n in WEIGHT_FILES if (ckpt.wav2vec / n).is_file()), None)
        if weights is None:
            problems.append(f"{ckpt.wav2vec} holds no wav2vec2 weights ({' or '.join(WEIGHT_FILES)}); re-download it")
        elif weights.suffix == ".safetensors":
            read_header(weights)
    except CheckpointError as e:
        problems.append(str(e))
    try:
        load_tokenizer(ckpt.tokenizer)
    except CheckpointError as e:
        problems.append(str(e))
    return problems


def checkpoint_report(ckpt_dir) -> tuple[list[tuple[str, str]], list[str]]:
    from lowvram.io.weights import discover

    rows, problems = [], []
    try:
        ckpt = discover(ckpt_dir)
    except CheckpointError as e:
        return rows, [str(e)]
    files = [ckpt.config, *ckpt.shards, ckpt.t5, ckpt.vae]
    from lowvram.quantize.shards import read_header

    for shard in ckpt.shards:
        try:
            read_header(shard)
        except CheckpointError as e:
            problems.append(f"{e} (an interrupted download?)")
    for f in files:
        size = f.stat().st_size
        rows.append((str(Path(f).relative_to(ckpt.root)), f"{size / 1e9:.2f} GB"))
        try:
            with open(f, "rb") as fh:
                fh.read(8)
        except OSError as e:
            problems.append(f"{f} is not readable ({e}); fix its permissions or re-download it")
        want = EXPECTED_BYTES.get(Path(f).name)
        if want and size > 1e8 and abs(size - want) / want > 0.05:
            problems.append(f"{f} is {size / 1e9:.2f} GB, expected ~{want / 1e9:.2f} GB: re-download it")
    try:
        cfg = ckpt.dit_config()
        rows.append(("DiT", f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads"))
    except CheckpointError as e:
        problems.append(str(e))
    problems += _folder_problems(ckpt)
    return rows, problems
