"""`lowvram batch JOBS`: many videos through one loaded model (lowvram.jobs.batch).

The model options (`model_options`) are shared with `lowvram ui`; every option here defaults to
None so that only the ones given on the command line overlay the rows' defaults.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from lowvram.cli.clickutil import Command
from lowvram.model.attention import AUTO_HELP as ATTENTION_AUTO_HELP
from lowvram.model.attention import CHOICES as ATTENTION_CHOICES

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def model_options(f):
    """The options that choose and place the model (`lowvram run`'s names), for batch and ui."""
    opts = [
        click.option("--ckpt-dir", type=click.Path(path_type=Path), default=None,
                     help="Wan2.2-S2V-14B directory, or one written by `lowvram quantize` "
                          "[default: ckpt/Wan2.2-S2V-14B]."),
        click.option("--lora", type=click.Path(path_type=Path), default=None,
                     help="LiveAvatar LoRA (.safetensors) [default: ckpt/LiveAvatar/liveavatar.safetensors]."),
        click.option("--lora-alpha", type=float, default=None, help="LoRA alpha when the file's metadata has none."),
        click.option("--device", default=None, help="cuda, cuda:N, cpu or auto [default: auto]."),
        click.option("--dtype", default=None, help="auto, bf16, fp16 or fp32 [default: auto]."),
        click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default=None,
                     help="Self-attention backend [default: the profile's; sdpa without a profile]; " + ATTENTION_AUTO_HELP),
        click.option("--t5", type=click.Choice(["bf16", "int8", "nf4"]), default=None,
                     help="Text-encoder precision [default: bf16]."),
        click.option("--no-verify", is_flag=True, default=None, help="Skip hashing the shards of a quantized directory."),
        click.option("--profile", default=None, help="Hardware profile (`lowvram profiles`), or none for all resident."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile field (repeatable)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def given(**kw) -> dict:
    """The options given on the command line, by option name (lowvram.jobs.options), with run's defaults
    for the checkpoint and LoRA."""
    from lowvram.cli.main import DEFAULT_CKPT, DEFAULT_LORA

    out = {"ckpt_dir": Path(DEFAULT_CKPT), "lora": Path(DEFAULT_LORA)}
    for k, v in kw.items():
        if k == "overrides":
            if v:
                out["set"] = tuple(v)
        elif k == "profile" and v is not None and v.lower() == "none":
            out[k] = None
        elif v is not None:
            out[k] = v
    return out


class _Signals:
    """SIGINT/SIGTERM: the first asks the batch to stop at a block boundary, a second one raises."""

    def __init__(self):
        self.stop, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        click.echo("stopping after the block in flight (again to abort)", err=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _summary(rows):
    from rich.console import Console
    from rich.table import Table

    folders = {Path(r.opts.out).parent for r in rows}
    short = len(folders) == 1  # one output folder: the title names it, the rows the files
    t = Table(title="lowvram batch" + (f" ({next(iter(folders))})" if short else ""))
    for col in ("row", "out", "status", "frames", "s", "FPS", "note"):
        t.add_column(col, justify="right" if col in ("row", "frames", "s", "FPS") else "left")
    style = {"done": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow"}
    for r in rows:
        res = r.outcome.result if r.outcome is not None else None
        nums = (str(res.frames), f"{res.seconds:.1f}", f"{res.fps:.2f}") if res is not None else ("", "", "")
        out = Path(r.opts.out).name if short else str(r.opts.out)
        t.add_row(str(r.index), out, f"[{style.get(r.status, 'dim')}]{r.status}[/]", *nums, r.note)
    Console().print(t)


@click.command("batch", cls=Command)
@click.argument("jobs", type=click.Path(path_type=Path))
@model_options
@click.option("--size", default=None, help="Default pixel-area budget W*H for rows without one [default: 704*384].")
@click.option("--num-clip", type=int, default=None, help="Default clip limit for rows without one.")
@click.option("--seed", type=int, default=None, help="Default seed for rows without one [default: 420].")
@click.option("--steps", type=int, default=None, help="Default Euler steps for rows without one [default: 4].")
@click.option("--prompt", default=None, help="Default prompt for rows without one.")
@click.option("--online-decode", is_flag=True, default=None, help="Refresh the sink at clip 1 in every job.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for rows without `out` (<jobs stem>-<row>.mp4) [default: the jobs file's folder].")
@click.option("--quiet", is_flag=True, help="No per-job progress display.")
def batch_cmd(jobs, out_dir, quiet, **kw):
    """Run every job of JOBS (.toml, .csv or .jsonl; keys are `lowvram run`'s option names) with one
    model load. Options given here are the defaults under every row; relative paths in the file resolve
    against its folder. Each output is written as <out stem>.partial.mp4 and renamed when complete, with a
    <out stem>.json sidecar; a rerun skips complete outputs and redoes interrupted ones. Ctrl-C or SIGTERM
    stops after the block in flight (the partial file stays playable).

    Exit code: 0 every job done (or already complete); 1 a job failed (the others ran); 130 interrupted;
    2 a bad jobs file or option (nothing ran).
    """
    from lowvram.cli.progress import RichProgress
    from lowvram.jobs.batch import exit_code, run_batch
    from lowvram.jobs.jobfile import read_jobs
    from lowvram.jobs.runner import make_runner

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    todo = read_jobs(jobs, defaults=given(**kw), out_dir=out_dir)
    log = lambda *a: click.echo(" ".join(map(str, a)), err=True)  # noqa: E731
    runner = make_runner(log=(lambda *a: None) if quiet else log)
    with _Signals() as sig:
        try:
            rows = run_batch(todo, runner, log=log, should_stop=lambda: sig.stop,
                             progress_factory=(lambda: None) if quiet else RichProgress)
        finally:
            runner.close()
    _summary(rows)
    click.get_current_context().exit(exit_code(rows))
