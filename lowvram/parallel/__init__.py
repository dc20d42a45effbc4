"""Timestep-forcing pipeline parallelism: `lowvram run --gpus N` and `lowvram plan --gpus N` (N = 2..5).

roles (who does what) -> plans (each rank against its own card) -> launch (N processes, or torchrun's) ->
world (process group, faults) -> rank (setup, report) -> loops (the ticks) with comm (block messages)
and writer (decode + mp4).
"""

from __future__ import annotations


def run_parallel(opts, gpus: int | None, progress=None, log=print, on_block=None, should_stop=None):
    """Run `opts` as a pipeline of `gpus` ranks: this process's own rank under torchrun (RANK/WORLD_SIZE set;
    returns the RunResult on the writer rank, None on the others), else N processes started here."""
    from lowvram.errors import LowvramError
    from lowvram.parallel.world import env_world

    world = env_world()
    if world is not None and world[1] > 1:
        if gpus is not None and gpus != world[1]:
            raise LowvramError(f"--gpus {gpus} but this rank was started in a group of WORLD_SIZE={world[1]}; "
                               f"pass --gpus {world[1]} or leave --gpus out under torchrun")
        return run_in_world(opts, progress, log)
    from lowvram.parallel.launch import launch

    return launch(opts, gpus, log=log, progress=progress, on_block=on_block, should_stop=should_stop)


def run_in_world(opts, progress=None, log=print):
    """This process is one rank of a group started by torchrun (or another launcher)."""
    import os
    import sys

    from lowvram.parallel.worker import serve

    rank = int(os.environ["RANK"])
    code, res, msg = serve(opts, log=lambda *a: log(f"rank {rank}:", *a), progress=progress)
    if code:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)  # no destructor may wait on a transfer a failed peer will never complete
    return res


def in_world() -> bool:
    from lowvram.parallel.world import env_world

    w = env_world()
    return w is not None and w[1] > 1
