"""The `lowvram batch` loop: many jobs through one runner, so the models load once.

Order: jobs are grouped by what the runner must reload when it changes (the load key: checkpoint, LoRA,
alpha, device, dtype), then by what makes it re-plan (profile, `--set`, attention, T5 mode and the
generated width x height, read from the image's header), and keep the file's order inside a group:
each load and each plan happens once per group. A job whose output is complete (lowvram.jobs.sidecar)
is skipped; a failing job is logged in one line and the loop goes on; an interrupted job (Ctrl-C,
SIGTERM, `should_stop`) ends the loop and the jobs after it are "not run".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowvram.jobs.execute import Outcome, execute
from lowvram.jobs.sidecar import is_complete
from lowvram.pipeline.options import RunOptions


@dataclass
class BatchRow:
    index: int                    # 1-based position in the jobs file
    opts: RunOptions
    status: str = "not run"       # done | skipped | failed | interrupted | not run
    note: str = ""
    outcome: Outcome | None = field(default=None, repr=False)


def load_key(opts: RunOptions) -> tuple:
    return (str(opts.ckpt_dir), str(opts.lora), opts.lora_alpha, opts.device, opts.dtype)


def plan_key(opts: RunOptions) -> tuple:
    return (opts.profile or "", tuple(opts.overrides), opts.attention, opts.t5, _generated_size(opts))


def _generated_size(opts: RunOptions) -> str:
    """W x H the run will generate (the image's aspect ratio under the --size budget), or --size as given."""
    from lowvram.errors import LowvramError
    from lowvram.runtime.plan import resolve_size

    try:
        w, h = resolve_size(opts.size, opts.image)  # reads the image's header only
        return f"{w}x{h}"
    except (OSError, ValueError, LowvramError):
        return str(opts.size)  # the job will fail with its own message when it runs


def order_for_reuse(jobs: list[RunOptions]) -> list[int]:
    """Indices into `jobs` in run order (see the module docstring); stable inside a group."""
    first_load, first_plan = {}, {}
    for i, o in enumerate(jobs):
        first_load.setdefault(load_key(o), i)
        first_plan.setdefault((load_key(o), plan_key(o)), i)
    return sorted(range(len(jobs)), key=lambda i: (first_load[load_key(jobs[i])],
                                                   first_plan[(load_key(jobs[i]), plan_key(jobs[i]))], i))


def run_batch(jobs: list[RunOptions], runner, log=print, should_stop=lambda: False,
              progress_factory=lambda: None) -> list[BatchRow]:
    """Run every job (see the module docstring); returns one row per job in file order."""
    rows = [BatchRow(i + 1, o) for i, o in enumerate(jobs)]
    order = order_for_reuse(jobs)
    for k, i in enumerate(order, 1):
        row = rows[i]
        tag = f"[{k}/{len(rows)}] row {row.index} -> {row.opts.out}"
        if should_stop():
            break
        done, why = is_complete(row.opts)
        if done:
            row.status, row.note = "skipped", "complete"
            log(f"{tag}: complete, skipped")
            continue
        log(f"{tag}: {why}, generating")
        oc = execute(runner, row.opts, progress=progress_factory(), should_stop=should_stop)
        row.outcome, row.status = oc, oc.status
        if oc.status == "failed":
            row.note = oc.error
            log(f"{tag}: failed: {oc.error}")
        elif oc.status == "interrupted":
            row.note = f"kept {Path(oc.file).name}" if oc.file else "no frames written"
            log(f"{tag}: interrupted, {row.note}")
            break
    return rows


def exit_code(rows: list[BatchRow]) -> int:
    """0: every job done or complete already; 130: interrupted (Ctrl-C / SIGTERM); 1: a job failed."""
    if any(r.status in ("interrupted", "not run") for r in rows):
        return 130
    return 1 if any(r.status == "failed" for r in rows) else 0
