"""Jobs: many videos from one loaded model, for `lowvram batch` and the `lowvram ui` web page.

options.py   `lowvram run`'s option names <-> RunOptions fields, typed, as jobs files and JSON hold them
jobfile.py   TOML / CSV / JSONL jobs files -> RunOptions, one-line errors naming the row and the key
runner.py    the runner interface (Session's `run` signature) and today's one-shot adapter
sidecar.py   `<out>.json` beside each mp4: inputs, settings, seed, plan headline, result; completeness
execute.py   one job: generate to `<stem>.partial.mp4`, rename when complete, write the sidecar
batch.py     the batch loop: ordering for reuse, skip-complete, continue-after-failure, summary rows
model.py     a web-page job (RunOptions + id + status + timestamps + progress) and its JSON
store.py     the persistent queue: one JSON file per job in the jobs directory, atomic writes
worker.py    the queue's thread: runs queued jobs one at a time, cancel at a block boundary
preview.py   the growing fragmented mp4's newest fragments -> an animated preview image
uploads.py   upload checks for the page (size limits, image, audio) as one-line messages
app.py       the Gradio page and its API
"""
