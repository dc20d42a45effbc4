"""The `lowvram ui` page (Gradio Blocks) over the store and the worker.

The queue runs in the worker thread, not in Gradio events, so jobs outlive browser tabs and restarts;
the page polls (a 0.5 s `gr.Timer`) and redraws a part only when the store's version moved. File inputs
reach the handlers unprocessed (`preprocess=False`): a bad upload is checked by lowvram.jobs.uploads and
shown as one line in the page instead of failing inside Gradio's image decoding.

API (gradio_client; README "Web page"): `/submit` -> (message, job id), `/job` and `/wait` ->
(job JSON, video), `/rerun` -> (message, new job id), `/cancel` -> message.
"""

from __future__ import annotations

import html
import time

import gradio as gr

from lowvram.errors import LowvramError
from lowvram.jobs import view
from lowvram.jobs.headline import NO_PROFILE, plan_headline, profile_fields
from lowvram.jobs.model import FINAL, QUEUED, RUNNING
from lowvram.jobs.uploads import MAX_UPLOAD_MB, check_portrait, check_voice

WHOLE, CLIPS = "whole audio", "N clips"
SIZES = ["704*384", "480*480", "1280*720", "256*320", "64*64"]
CSS = """
.lv-status progress {width: 100%; height: 14px;}
.lv-plan {color: var(--body-text-color-subdued); font-size: 0.9em; margin-top: 4px;}
#message .lv-err {color: var(--error-text-color, #b91c1c); font-weight: 600;}
#message .lv-ok {color: var(--color-green-600, #15803d);}
"""


def _err(text: str) -> str:
    return f"<span class='lv-err'>⚠ {html.escape(text)}</span>"


def _ok(text: str) -> str:
    return f"<span class='lv-ok'>✓ {html.escape(text)}</span>"


def _int(value, name: str, lo: int | None = None) -> int:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        raise LowvramError(f"{name} must be a whole number (got {value!r})") from None
    if lo is not None and v < lo:
        raise LowvramError(f"{name} must be at least {lo} (got {v})")
    return v


class App:
    def __init__(self, store, worker, model_options: dict, profile: str | None = None, size: str = "704*384",
                 upload_mb: float = MAX_UPLOAD_MB, on_cuda: bool = False, overrides=()):
        self.store, self.worker, self.model = store, worker, model_options
        self.profile = profile or NO_PROFILE
        self.overrides = "\n".join(overrides)
        self.size, self.upload_mb, self.on_cuda = size, upload_mb, on_cuda

    # ---- handlers (plain functions of plain values: the tests call them directly too)

    def check_uploads(self, portrait, voice, size):
        """-> (message, portrait, voice): a line per upload; a bad upload is also cleared from its input."""
        msgs, keep = [], []
        for payload, check in ((portrait, lambda p: check_portrait(p, size or self.size, self.upload_mb)),
                               (voice, lambda p: check_voice(p, self.upload_mb))):
            keep.append(gr.skip())
            if payload is None:
                continue
            try:
                got = check(payload)
                msgs.append(_ok(f"{got[1]} is usable" + (f" ({got[2]:.1f} s)" if len(got) > 2 else "")))
            except LowvramError as e:
                msgs.append(_err(str(e)))
                keep[-1] = None
        return "<br>".join(msgs), *keep

    def settings(self, prompt, profile, size, seed, length, clips, overrides, steps) -> dict:
        from lowvram.io.media import parse_area
        from lowvram.runtime.profile import Profile, parse_set

        if not (prompt or "").strip():
            raise LowvramError("no prompt: describe the scene, e.g. 'A woman talking to the camera'")
        size = (size or self.size).strip()
        parse_area(size)
        sets = [line.strip() for line in (overrides or "").replace(";", "\n").splitlines() if line.strip()]
        profile = None if not profile or profile == NO_PROFILE else profile
        if sets and profile is None:
            raise LowvramError("profile overrides need a profile; pick one above or clear the overrides")
        if profile is not None:
            Profile.from_name(profile, **parse_set(sets))  # unknown keys and bad values: one line now
        return {"prompt": prompt.strip(), "size": size, "seed": _int(seed, "seed"), "steps": _int(steps, "steps", 1),
                "num_clip": None if length != CLIPS else _int(clips, "clips", 1), "profile": profile, "overrides": sets}

    def submit(self, portrait, voice, prompt, profile, size, seed, length, clips, overrides, steps):
        """-> (message, job id or "")."""
        try:
            settings = self.settings(prompt, profile, size, seed, length, clips, overrides, steps)
            image, _ = check_portrait(portrait, settings["size"], self.upload_mb)
            audio, _, _ = check_voice(voice, self.upload_mb)
        except LowvramError as e:
            return _err(" ".join(str(e).split())), ""
        job = self.store.add(settings, {"image": image, "audio": audio})
        self.worker.wake()
        ahead = sum(j.status in (QUEUED, RUNNING) for j in self.store.all()) - 1
        return _ok(f"job {job.id} queued" + (f" behind {ahead} job(s)" if ahead else ", starting")), job.id

    def headline(self, profile, size, overrides, portrait) -> str:
        from lowvram.jobs.uploads import upload_path

        got = upload_path(portrait)
        sets = [s.strip() for s in (overrides or "").replace(";", "\n").splitlines() if s.strip()]
        line = plan_headline(self.model["ckpt_dir"], profile, size or self.size, sets, got[0] if got else None)
        return f"**Plan:** {html.escape(line)}"

    def fields(self, profile, overrides) -> str:
        sets = [s.strip() for s in (overrides or "").replace(";", "\n").splitlines() if s.strip()]
        return f"```\n{profile_fields(profile, sets)}\n```"

    def _video(self, job):
        path = self.store.path(job.id, job.video)
        return str(path) if path is not None and path.is_file() else None

    def refresh(self, seen: dict):
        """Timer tick -> (seen, status, preview, latest video, queue, gallery, gallery ids); parts whose
        content did not change are skipped, so a browser downloads each file once."""
        jobs = self.store.all()
        running = next((j for j in jobs if j.status == RUNNING), None)
        queued = sum(j.status == QUEUED for j in jobs)
        latest = next((j for j in reversed(jobs) if j.status in FINAL and self._video(j)), None)
        shown = view.gallery_jobs(jobs)
        parts = {
            "status": view.status_html(running, queued, self.on_cuda),
            "preview": str(self.store.path(running.id, running.preview)) if running and running.preview else None,
            "latest": self._video(latest) if latest else None,
            "queue": view.queue_rows(jobs),
            "gallery": [(str(self.store.path(j.id, j.thumb)), view.caption(j)) for j in shown],
        }
        seen = dict(seen or {})
        out = []
        for key, value in parts.items():
            if key == "preview" and value is None and running is not None:
                out.append(gr.skip())  # a new job keeps the last frames until its own arrive
                continue
            if seen.get(key) == repr(value):
                out.append(gr.skip())
            else:
                seen[key] = repr(value)
                out.append(value)
        ids = [j.id for j in shown]
        return (seen, *out, ids)

    def show(self, job_id):
        """-> (job JSON, video, portrait, voice) of one job."""
        job = self.store.get(job_id or "")
        if job is None:
            return {"error": f"no job {job_id!r}"}, None, None, None
        files = [self.store.path(job.id, job.settings.get(k)) for k in ("image", "audio")]
        return (view.detail(job, self.store), self._video(job),
                *(str(f) if f is not None and f.is_file() else None for f in files))

    def wait(self, job_id, timeout_s):
        """-> (job JSON, video) once the job is finished or after timeout_s seconds."""
        deadline = time.monotonic() + float(timeout_s or 600)
        while time.monotonic() < deadline:
            job = self.store.get(job_id or "")
            if job is None or job.status in FINAL:
                break
            time.sleep(0.25)
        return self.show(job_id)[:2]

    def rerun(self, job_id):
        """-> (message, new job id): the same settings and input files, queued again."""
        job = self.store.get(job_id or "")
        if job is None:
            return _err(f"no job {job_id!r}: pick one in the gallery or the queue"), ""
        files = {k: self.store.path(job.id, job.settings[k]) for k in ("image", "audio")}
        if not all(p.is_file() for p in files.values()):
            return _err(f"job {job.id}'s input files are gone; submit it again"), ""
        new = self.store.add(job.settings, files, rerun_of=job.id)
        self.worker.wake()
        return _ok(f"job {new.id} queued (re-run of {job.id})"), new.id

    def cancel(self, job_id):
        return _ok(self.worker.cancel(job_id or ""))

    def cancel_running(self):
        if self.worker.current is None:
            return _ok("nothing is running")
        return self.cancel(self.worker.current)

    # ---- the page

    def build(self) -> gr.Blocks:
        from lowvram.runtime.profile import Profile

        with gr.Blocks(title="lowvram") as page:
            gr.Markdown(f"## lowvram · Live Avatar\nModel `{self.model['ckpt_dir']}` on `{self.model.get('device')}` · "
                        f"jobs in `{self.store.root}` · uploads up to {self.upload_mb:.0f} MB")
            with gr.Row():
                with gr.Column(scale=1):
                    portrait = gr.Image(label="Portrait", type="filepath", sources=["upload"], image_mode=None,
                                        height=240, elem_id="portrait")
                    voice = gr.Audio(label="Voice (upload or record)", type="filepath",
                                     sources=["upload", "microphone"], elem_id="voice")
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                        value="A person talking to the camera, natural light.")
                    with gr.Row():
                        profile = gr.Dropdown([NO_PROFILE, "auto", *Profile.names()], value=self.profile,
                                              label="Profile", elem_id="profile")
                        size = gr.Dropdown(list(dict.fromkeys([self.size, *SIZES])), value=self.size,
                                           allow_custom_value=True, label="Size budget (W*H)", elem_id="size")
                    plan = gr.Markdown(elem_id="plan")
                    with gr.Row():
                        seed = gr.Number(420, label="Seed", precision=0, elem_id="seed")
                        length = gr.Radio([WHOLE, CLIPS], value=WHOLE, label="Length", elem_id="length")
                        clips = gr.Number(1, label="Clips (48 frames each)", precision=0, minimum=1, elem_id="clips")
                    with gr.Accordion("Advanced: profile overrides", open=False):
                        overrides = gr.Textbox(self.overrides, label="Overrides, one KEY=VALUE per line (as --set)",
                                               lines=3,
                                               placeholder="kv_dtype=bf16\nblocks_resident=20", elem_id="overrides")
                        steps = gr.Number(4, label="Euler steps (the LoRA is distilled for 4)", precision=0,
                                          minimum=1, elem_id="steps")
                        fields = gr.Markdown(elem_id="profile-fields")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    message = gr.HTML(elem_id="message")
                with gr.Column(scale=1):
                    status = gr.HTML(view.status_html(None, 0, self.on_cuda), elem_id="status")
                    preview = gr.Image(label="Live preview (newest block)", type="filepath", interactive=False,
                                       height=300, elem_id="preview")
                    stop = gr.Button("Cancel (keeps the partial video)", variant="stop", elem_id="cancel")
                    latest = gr.Video(label="Latest video", interactive=False, autoplay=False, height=320, elem_id="latest")
            queue = gr.Dataframe(headers=view.QUEUE_HEADERS, value=[], label="Queue", interactive=False,
                                 wrap=True, elem_id="queue")
            gallery = gr.Gallery(label="Gallery (click one for its video, inputs and settings)", columns=5,
                                 height=240, allow_preview=False, fit_columns=False, object_fit="contain",
                                 elem_id="gallery")
            with gr.Accordion("Job", open=True):
                with gr.Row():
                    job_id = gr.Textbox(label="Job id", scale=3, elem_id="job-id")
                    show = gr.Button("Show", scale=1, elem_id="show")
                    again = gr.Button("Re-run", scale=1, elem_id="rerun")
                    drop = gr.Button("Cancel job", scale=1, elem_id="cancel-job")
                with gr.Row():
                    job_video = gr.Video(label="Video", interactive=False, height=300, elem_id="job-video")
                    with gr.Column():
                        job_portrait = gr.Image(label="Its portrait", type="filepath", interactive=False, height=160)
                        job_voice = gr.Audio(label="Its voice", type="filepath", interactive=False)
                    job_json = gr.JSON(label="Settings and result", elem_id="job-json")
            timeout = gr.Number(600, visible=False)
            wait_btn = gr.Button(visible=False)
            seen, ids = gr.State({}), gr.State([])

            inputs = [portrait, voice, prompt, profile, size, seed, length, clips, overrides, steps]
            go.click(self.submit, inputs, [message, job_id], preprocess=False, api_name="submit")
            for ev in (portrait.upload, voice.upload, voice.stop_recording):
                ev(self.check_uploads, [portrait, voice, size], [message, portrait, voice], preprocess=False,
                   api_visibility="private")
            for ev in (profile.change, size.change, overrides.blur, portrait.change, page.load):
                ev(self.headline, [profile, size, overrides, portrait], plan, preprocess=False,
                   api_visibility="private")
            for ev in (profile.change, overrides.blur, page.load):
                ev(self.fields, [profile, overrides], fields, api_visibility="private")
            gr.Timer(0.5).tick(self.refresh, seen, [seen, status, preview, latest, queue, gallery, ids],
                               api_visibility="private", show_progress="hidden", concurrency_limit=None)
            stop.click(self.cancel_running, None, message, api_visibility="private")
            detail = [job_json, job_video, job_portrait, job_voice]
            show.click(self.show, job_id, detail, api_name="job", concurrency_limit=None)
            again.click(self.rerun, job_id, [message, job_id], api_name="rerun")
            drop.click(self.cancel, job_id, message, api_name="cancel")
            wait_btn.click(self.wait, [job_id, timeout], [job_json, job_video], api_name="wait", concurrency_limit=None)

            def pick_gallery(ids, evt: gr.SelectData):
                return ids[evt.index] if 0 <= evt.index < len(ids) else ""

            def pick_queue(evt: gr.SelectData):
                return (evt.row_value or [""])[0]

            gallery.select(pick_gallery, ids, job_id, api_visibility="private").then(
                self.show, job_id, detail, api_visibility="private")
            queue.select(pick_queue, None, job_id, api_visibility="private").then(
                self.show, job_id, detail, api_visibility="private")
        return page
