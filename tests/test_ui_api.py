"""The page's API through the Gradio client, as the README shows it: submit a job, wait for it, fetch the
video; a bad upload is a message and no job. In-process server on the tiny checkpoint (CPU)."""

import socket
from pathlib import Path

import av
import pytest

from lowvram.demo.inputs import synth_portrait, synth_voice

gr = pytest.importorskip("gradio")
client_mod = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    from lowvram.jobs.app import CSS, App
    from lowvram.jobs.runner import make_runner
    from lowvram.jobs.store import JobStore
    from lowvram.jobs.worker import Worker

    ckpt, lora = tiny_ckpt
    d = tmp_path_factory.mktemp("ui-api")
    model = {"ckpt_dir": str(ckpt), "lora": str(lora), "device": "cpu"}
    store = JobStore(d / "jobs", log=lambda *a: None)
    worker = Worker(store, make_runner(log=lambda *a: None), model, log=lambda *a: None).start()
    page = App(store, worker, model, size="64*64").build()
    gr.set_static_paths([str(store.root)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page.queue(default_concurrency_limit=4)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                allowed_paths=[str(store.root)], css=CSS)
    synth_portrait(str(d / "me.png"), width=96, height=96, seed=7)
    synth_voice(str(d / "me.wav"), seconds=1.0, seed=7)
    (d / "me.txt.png").write_text("no picture")
    yield f"http://127.0.0.1:{port}/", d, store
    page.close()
    worker.shutdown()
    store.close()


@pytest.mark.slow
def test_client_submits_a_job_waits_and_fetches_the_video(served):
    from gradio_client import Client, handle_file

    url, d, store = served
    c = Client(url, verbose=False)
    assert {"/submit", "/job", "/wait", "/rerun", "/cancel"} <= set(c.view_api(print_info=False,
                                                                           return_format="dict")["named_endpoints"])
    msg, job_id = c.predict(handle_file(str(d / "me.png")), handle_file(str(d / "me.wav")), "a person talking",
                            "none", "64*64", 5, "N clips", 1, "", 4, api_name="/submit")
    assert "queued" in msg and job_id
    job, video = c.predict(job_id, 600, api_name="/wait")
    assert job["status"] == "done" and job["settings"]["seed"] == 5 and job["result"]["frames"] == 45
    assert job["sidecar"]["status"] == "done" and job["sidecar"]["headline"]
    with av.open(video["video"] if isinstance(video, dict) else video) as f:
        assert sum(1 for _ in f.decode(video=0)) == 45
    assert Path(store.folder(job_id) / "video.mp4").is_file()
    again = c.predict(job_id, api_name="/job")[0]
    assert again["id"] == job_id and again["status"] == "done"


def test_client_bad_upload_is_a_message_and_no_job(served):
    from gradio_client import Client, handle_file

    url, d, store = served
    before = len(store.all())
    msg, job_id = Client(url, verbose=False).predict(
        handle_file(str(d / "me.txt.png")), handle_file(str(d / "me.wav")), "x", "none", "64*64", 1, "whole audio", 1,
        "", 4, api_name="/submit")
    assert "cannot read image me.txt.png" in msg and job_id == "" and len(store.all()) == before
