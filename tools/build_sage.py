"""Build SageAttention 2 (github.com/thu-ml/SageAttention, Apache-2.0) from a source checkout, in place.

    python3 tools/build_sage.py SRC [--arch 9.0] [--trim]     # then PYTHONPATH=SRC imports `sageattention`

Users install it with `pip install --no-build-isolation git+https://github.com/thu-ml/SageAttention.git`
(a CUDA toolkit is needed; lowvram's attention "sage" uses it where it imports). This script is the bench
machine's way: no network there, so the source travels with the work tree and builds in place.
--trim compiles only what lowvram calls (head dim 128, bf16 outputs, non-causal, no log-sum-exp, per-thread
Q/K scales): the upstream dispatch instantiates every combination, 64 kernels in the sm_90 file alone, which
takes most of a bench call's ten minutes; trimmed, the whole build takes about a minute on 16 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

# macro -> the one value lowvram passes (the rest of each macro's branches are dropped)
TRIM = {"DISPATCH_HEAD_DIM": ("head_dim", "int", "128"), "DISPATCH_CAUSAL": ("is_causal", "bool", "0"),
        "DISPATCH_QK_QUANT_GRAN": ("qk_quant_gran", "int", "3"), "DISPATCH_RETURN_LSE": ("return_lse", "bool", "0")}


def trimmed_header(text: str) -> str:
    """dispatch_utils.h with TRIM's macros selecting one value and the dtype macro bf16 only."""
    for macro, (arg, kind, value) in TRIM.items():
        pat = re.compile(rf"#define {macro}\((\w+), (\w+), \.\.\.\)(?:.*\\\n)*.*\n")
        m = pat.search(text)
        if m is None:
            raise SystemExit(f"build_sage: {macro} not found in dispatch_utils.h; build without --trim")
        var, const = m.group(1), m.group(2)
        cval = {"bool": "true" if value == "1" else "false"}.get(kind, value)
        ctype = "bool" if kind == "bool" else "int"
        body = (f"#define {macro}({var}, {const}, ...) \\\n"
                f"  if ({var} == {value}) {{ constexpr {ctype} {const} = {cval}; __VA_ARGS__ }} \\\n"
                f"  else {{ throw std::invalid_argument(\"lowvram's trimmed SageAttention build: {arg} \" "
                f"+ std::to_string(int({var}))); }}\n")
        text = text[:m.start()] + body + text[m.end():]
    m = re.search(r"#define DISPATCH_PYTORCH_DTYPE_TO_CTYPE_FP16\((\w+), (\w+), \.\.\.\)(?:.*\\\n)*.*\n", text)
    if m is None:
        raise SystemExit("build_sage: the dtype macro not found in dispatch_utils.h; build without --trim")
    var, ctype = m.group(1), m.group(2)
    body = (f"#define DISPATCH_PYTORCH_DTYPE_TO_CTYPE_FP16({var}, {ctype}, ...) \\\n"
            f"  if ({var} == at::ScalarType::BFloat16) {{ using {ctype} = nv_bfloat16; __VA_ARGS__ }} \\\n"
            f"  else {{ TORCH_CHECK(false, \"lowvram's trimmed SageAttention build: bf16 only\"); }}\n")
    return text[:m.start()] + body + text[m.end():]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="a SageAttention source checkout (setup.py, csrc/, sageattention/)")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (default 9.0: every kernel for sm_90a)")
    ap.add_argument("--trim", action="store_true", help="only the kernels lowvram calls (see the docstring)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    a = ap.parse_args()
    header = os.path.join(a.src, "csrc", "dispatch_utils.h")
    if a.trim:
        with open(header) as f:
            text = f.read()
        if "lowvram's trimmed" not in text:
            with open(header, "w") as f:
                f.write(trimmed_header(text))
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=a.arch, EXT_PARALLEL="4", MAX_JOBS=str(a.jobs))
    t = time.time()
    rc = subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=a.src, env=env)
    print(f"build_sage: rc {rc} in {time.time() - t:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
