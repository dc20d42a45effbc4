"""A rank's process: `serve` runs one rank and turns whatever ends it into an exit code and one line.

`python -m lowvram.parallel.worker` is a child of lowvram.parallel.launch (its options come as JSON in
LOWVRAM_TPP_OPTS, its log goes to a file the launcher keeps on failure); under torchrun the CLI calls
`serve` itself. Exit codes: 0 done or stopped, 2 a LowvramError of this rank (its plan, its inputs),
1 an unexpected exception (traceback in the log), 3 stopped because another rank failed. A failing rank
records its line under `error/<rank>` and, unless a cause is recorded already, under `abort`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

OPTS_ENV = "LOWVRAM_TPP_OPTS"
PATH_FIELDS = ("ckpt_dir", "image", "audio", "lora", "out", "report", "vae_path")


def options_to_json(opts) -> str:
    d = dataclasses.asdict(opts)
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()})


def options_from_json(text: str):
    from lowvram.pipeline.options import RunOptions

    d = json.loads(text)
    for k in PATH_FIELDS:
        if d.get(k) is not None:
            d[k] = Path(d[k])
    d["overrides"] = tuple(d.get("overrides") or ())
    return RunOptions(**d)


def device_type(opts) -> str:
    import torch

    if opts.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(opts.device).startswith("cuda") else "cpu"


def serve(opts, log=print, progress=None):
    """Run this process's rank of `opts`; returns (exit code, RunResult of the writer or None, error line)."""
    from lowvram.errors import LowvramError
    from lowvram.pipeline.run import StopFlag

    from lowvram.parallel.rank import Rank
    from lowvram.parallel.world import PeerFailed, World

    try:
        world = World.init(device_type(opts))
    except LowvramError as e:
        return e.exit_code, None, " ".join(str(e).split())
    rank = None
    with StopFlag() as flag:
        try:
            rank = Rank(opts, world, log=log, progress=progress, local_stop=lambda: flag.stop)
            res = rank.run()
        except PeerFailed as e:
            return e.exit_code, None, str(e)
        except LowvramError as e:
            code, msg = e.exit_code, " ".join(str(e).split())
        except BaseException as e:  # noqa: BLE001 - every way out of a rank is reported
            traceback.print_exc()
            where = f"rank {world.rank}" + (f" ({rank.role.describe()})" if rank is not None else "")
            first = (str(e).strip().splitlines() or [""])[0][:300]
            code, msg = 1, f"{where} failed: {type(e).__name__}{': ' + first if first else ''}"
        else:
            if not rank.interrupted:
                world.close()
            return 0, res, None
    try:
        world.store.set(f"error/{world.rank}", msg)
        msg = rank.watch.abort(msg) if rank is not None else msg
    except Exception:
        pass
    return code, None, msg


def _die_with_parent() -> None:
    """SIGTERM when the launcher dies (Linux), so no rank outlives it."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl
        os._exit(3)


def main() -> None:
    import faulthandler
    import signal

    _die_with_parent()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack to the rank's log
    opts = options_from_json(os.environ[OPTS_ENV])
    rank = os.environ.get("RANK", "?")

    def log(*a):
        print(f"rank {rank}:", *a, flush=True)

    code, _, msg = serve(opts, log=log)
    if msg:
        print(f"rank {rank}: error: {msg}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no destructor may wait on a transfer a stopped or failed peer will never complete


if __name__ == "__main__":
    main()
