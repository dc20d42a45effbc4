"""`lowvram run --gpus N` without torchrun: start N rank processes, watch them, report one result or one line.

Before any process starts: the roles (at most steps + 1 ranks), the devices (`--device cuda` needs N
visible GPUs; `--device cpu` runs the ranks as CPU processes over gloo) and the inputs are checked, so
those mistakes are one-line errors with nothing loaded. The launcher hosts the TCPStore the ranks meet
at (port chosen by the OS) and starts each rank as `python -m lowvram.parallel.worker` in its own
session with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), NCCL_NVLS_ENABLE=0
(NVLink multicast off) and, on the CPU, OMP_NUM_THREADS = cores / N. Each rank's output goes to a log
file, kept when the run fails.

While they run it polls every POLL_S: the children's exit status, the writer's progress (`written`,
`event`: the progress display and on_block), and stop requests (SIGINT/SIGTERM here, or should_stop()),
which it passes on as the store's `stop` key: every rank stops at its next block boundary and the writer
closes the file. A second signal kills the ranks at once. When a rank exits with an error or is killed,
the launcher records the root cause (the first rank that failed by itself, not one that lost a peer) as
`abort`, lets the others exit (they see it within POLL_S), kills any left after GRACE_S, and raises one
line naming the rank and the cause.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.parallel.rank import T0_ENV
from lowvram.parallel.roles import Pipeline
from lowvram.parallel.worker import OPTS_ENV, device_type, options_to_json
from lowvram.parallel.world import STORE_ENV

POLL_S = 0.05
GRACE_S = 5.0


class RankFailure(LowvramError):
    """A rank died or raised; the message names it (exit code 1: not the user's mistake)."""

    exit_code = 1


def check_launch(opts, gpus: int) -> Pipeline:
    """Everything that can be checked before a process starts (module docstring)."""
    import torch

    from lowvram.pipeline.options import check_inputs, resolve_device

    pipe = Pipeline.of(gpus, opts.steps)
    dev = str(opts.device)
    if dev.startswith("cuda") and dev != "cuda":
        raise LowvramError(f"--device {dev} with --gpus: rank k runs on cuda:k; use --device cuda "
                           "(and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if dev == "cuda" or (dev == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        if n < gpus:
            raise LowvramError(f"--gpus {gpus} asks for {gpus} GPUs but this machine has {n} visible CUDA GPU(s); "
                               f"use --gpus {max(1, n)} or fewer, or --device cpu to run the ranks as CPU processes")
    else:
        resolve_device(dev, opts.dtype)
    check_inputs(opts)
    from lowvram.io.locks import lock_output

    with lock_output(opts.out):  # another run writing this --out: refused before any process starts
        pass
    return pipe


class Launcher:
    def __init__(self, opts, gpus: int, log=print, progress=None, on_block=None, should_stop=None):
        self.opts, self.gpus, self.log, self.progress = opts, gpus, log, progress
        self.on_block, self.should_stop = on_block, should_stop
        self.procs: list[subprocess.Popen] = []
        self.signals = 0
        self.first_signal: int | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self):
        """Start the ranks, wait for them; the writer's ParallelResult, or RankFailure / LowvramError."""
        import torch.distributed as dist

        pipe = check_launch(self.opts, self.gpus)
        self.roles = pipe.roles
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.ctl = dist.PrefixStore("lowvram", store)
        self.rundir = Path(tempfile.mkdtemp(prefix="lowvram-tpp-"))
        keep = True
        t0 = time.time()
        try:
            with self._signals():
                self.procs = [self._spawn(r, store.port, t0) for r in range(self.gpus)]
                res = self._watch()
            keep = False
            res.stop_signal = self.first_signal if res.interrupted else None
            return res
        finally:
            self._teardown()
            if not keep:
                shutil.rmtree(self.rundir, ignore_errors=True)

    # ------------------------------------------------------------------ processes
    def _spawn(self, rank: int, port: int, t0: float) -> subprocess.Popen:
        env = dict(os.environ)
        env.update({"RANK": str(rank), "WORLD_SIZE": str(self.gpus), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(self.gpus), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    STORE_ENV: f"127.0.0.1:{port}", OPTS_ENV: options_to_json(self.opts), T0_ENV: repr(t0),
                    "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"})
        if device_type(self.opts) == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.gpus)))
        logf = open(self.rundir / f"rank{rank}.log", "wb")
        try:
            return subprocess.Popen([sys.executable, "-m", "lowvram.parallel.worker"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logf.close()

    def _teardown(self) -> None:
        """Every rank gone: given GRACE_S to exit on its own (it has seen `abort` or `stop`), then killed."""
        deadline = time.monotonic() + GRACE_S
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        for p in self.procs:
            p.wait()

    class _Signals:
        def __init__(self, launcher):
            self.launcher, self.old = launcher, {}

        def __enter__(self):
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self.old[sig] = signal.signal(sig, self._handle)
            return self

        def _handle(self, signum, frame):
            self.launcher.signals += 1
            self.launcher.first_signal = self.launcher.first_signal or signum
            if self.launcher.signals > 1:  # a second signal: no more waiting
                for p in self.launcher.procs:
                    if p.poll() is None:
                        p.kill()

        def __exit__(self, *exc):
            for sig, old in self.old.items():
                signal.signal(sig, old)

    def _signals(self):
        return self._Signals(self)

    # ------------------------------------------------------------------ the watch
    def _watch(self):
        from lowvram.pipeline.options import BlockEvent

        from lowvram.parallel.result import ParallelResult

        exits: dict[int, tuple[int, float]] = {}
        started, seen, stop_sent = False, 0, False
        while True:
            for r, p in enumerate(self.procs):
                if r not in exits and p.poll() is not None:
                    exits[r] = (p.returncode, time.monotonic())
            if self.progress is not None and not started and self.ctl.check(["start"]):
                self.progress.start(**json.loads(self.ctl.get("start")))
                started = True
            n = int(self.ctl.add("written", 0))
            if n > seen:
                seen = n
                ev = BlockEvent(**json.loads(self.ctl.get("event")))
                if self.progress is not None and started:
                    self.progress.block_done(ev.clip, ev.block, ev.frames, ev.seconds, ev.peak_vram_bytes)
                if self.on_block is not None:
                    self.on_block(ev)
            if not stop_sent and (self.signals or (self.should_stop is not None and self.should_stop())):
                self.ctl.set("stop", "launcher")
                stop_sent = True
            if any(code != 0 for code, _ in exits.values()):
                self._finish_progress(started)
                raise self._failure(exits)
            if len(exits) == len(self.procs):
                self._finish_progress(started)
                return ParallelResult.from_json(self.ctl.get("result").decode())
            time.sleep(POLL_S)

    def _finish_progress(self, started: bool) -> None:
        if self.progress is not None and started:
            self.progress.finish()

    def _failure(self, exits: dict) -> RankFailure:
        """The root cause as one line; `abort` set so every rank stops; the others given GRACE_S to exit."""
        order = sorted(((t, r, code) for r, (code, t) in exits.items() if code != 0))
        own = [(t, r, c) for t, r, c in order if c != 3]
        _, root, code = (own or order)[0]
        msg = self._error_of(root, code)
        self.ctl.compare_set("abort", "", msg)
        self._teardown()
        kept = self._kept()
        if code == 2 and not kept:
            return LowvramError(msg)  # found by a rank before any frame (its plan, its card): exit code 2
        frames = f"; {kept}" if kept else ""
        logs = f" (rank logs in {self.rundir})" if code == 1 else ""
        return RankFailure(f"{msg}{frames}; the other ranks stopped{logs}")

    def _error_of(self, rank: int, code: int) -> str:
        role = self.roles[rank].describe()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"rank {rank} ({role}) was killed by {name}"
        if self.ctl.check([f"error/{rank}"]):
            return self.ctl.get(f"error/{rank}").decode()
        return f"rank {rank} ({role}) exited with code {code}"

    def _kept(self) -> str:
        if not self.ctl.check(["event"]):
            return ""
        ev = json.loads(self.ctl.get("event"))
        return f"{ev['path']} keeps the {ev['frames']} frames of {ev['blocks_done']} finished block(s)"


def launch(opts, gpus: int, log=print, progress=None, on_block=None, should_stop=None):
    """Run `opts` on `gpus` rank processes started here (see Launcher)."""
    return Launcher(opts, gpus, log, progress, on_block, should_stop).run()
