"""`lowvram ui`: the web page (lowvram.jobs.app) with its persistent queue, served by Gradio."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from pathlib import Path

import click

from lowvram.cli.batch import given, model_options
from lowvram.cli.clickutil import Command
from lowvram.errors import LowvramError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth(text: str | None):
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise LowvramError("--auth must be USER:PASSWORD (both non-empty)")
    return (user, password)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


MODEL_FIELDS = ("ckpt_dir", "lora", "lora_alpha", "device", "dtype", "attention", "t5")


@click.command("ui", cls=Command)
@model_options
@click.option("--size", default="704*384", show_default=True, help="The page's default size budget W*H.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; anything but loopback makes the page reachable from other machines.")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to serve on.")
@click.option("--auth", default=None, metavar="USER:PASSWORD", help="Ask for this login before showing the page.")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("lowvram-jobs"),
              show_default=True, help="The queue, the uploads and the videos (survives restarts).")
@click.option("--max-upload-mb", type=float, default=50, show_default=True, help="Largest upload the page takes.")
def ui_cmd(size, host, port, auth, jobs_dir, max_upload_mb, **kw):
    """A web page: portrait + voice + prompt -> video, with live preview, a job queue and a gallery.
    The models are loaded once for all jobs (once issue 10's Session lands; today once per job)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    login = _auth(auth)
    if not _loopback(host):
        click.echo(f"warning: --host {host} serves the page to other machines: anyone who reaches it can run jobs "
                   f"and read every upload and video{'' if login else '; add --auth USER:PASSWORD'}", err=True)
    from lowvram.io.media import parse_area

    parse_area(size)
    import gradio as gr
    import torch

    from lowvram.jobs.app import CSS, App
    from lowvram.jobs.runner import make_runner
    from lowvram.jobs.store import JobStore
    from lowvram.jobs.worker import Worker

    opts = given(**kw)
    profile = kw.get("profile")  # the page's defaults for the profile and its overrides (the advanced fold)
    model = {k: str(v) if isinstance(v, Path) else v for k, v in opts.items() if k in MODEL_FIELDS}
    if opts.get("no_verify"):
        model["verify"] = False
    if profile is None and torch.cuda.is_available():
        profile = "auto"
    log = lambda *a: click.echo(" ".join(map(str, a)), err=True)  # noqa: E731
    store = JobStore(jobs_dir, log=log)
    runner = make_runner(log=log)
    worker = Worker(store, runner, model, log=log).start()
    on_cuda = model.get("device", "auto") != "cpu" and torch.cuda.is_available()
    app = App(store, worker, model, profile=profile, size=size, upload_mb=max_upload_mb, on_cuda=on_cuda,
              overrides=opts.get("set", ()))
    page = app.build()
    gr.set_static_paths([str(jobs_dir.resolve())])
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C: the running job ends at a block
    page.queue(default_concurrency_limit=4)
    page.launch(server_name=host, server_port=port, auth=login, max_file_size=f"{max_upload_mb:g}mb",
                allowed_paths=[str(jobs_dir.resolve())], prevent_thread_lock=True, ssr_mode=False, quiet=True,
                css=CSS, show_error=False, footer_links=["api"])
    click.echo(f"lowvram ui: http://{host}:{port}/  (jobs in {jobs_dir}; Ctrl-C stops after the block in flight)",
               err=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("stopping: the running job ends after the block in flight", err=True)
    finally:
        if worker.shutdown(timeout=60):
            runner.close()
        page.close()
        store.close()
