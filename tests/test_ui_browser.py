"""`lowvram ui` in a real headless browser (Debian's chromium + chromedriver, driven by Selenium), on the
tiny checkpoint on the CPU: bad uploads, a job with its live preview and its final video playing, a
second job queued and cancelled, Cancel of a running job keeping a playable partial video, and a
restart (the server killed) that keeps the queue and the gallery. A screenshot of each state is saved
under the module's temporary directory (printed at the end)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

import pytest

from lowvram.demo.inputs import synth_portrait, synth_voice

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]
from selenium.webdriver.common.by import By  # noqa: E402

FLAGS = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
         "--disable-component-update --disable-sync --window-size=1400,1800 --autoplay-policy=no-user-gesture-required")
SLOW = 600  # seconds: generous for a loaded 2-core machine; a healthy run takes a small part of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lowvram ui` in a subprocess on a free port; the same jobs directory across restarts."""

    def __init__(self, tiny_ckpt, jobs, log):
        self.tiny_ckpt, self.jobs, self.log, self.proc = tiny_ckpt, jobs, log, None

    def start(self):
        ckpt, lora = self.tiny_ckpt
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lowvram.cli.main", "ui", "--ckpt-dir", str(ckpt), "--lora", str(lora),
             "--device", "cpu", "--size", "64*64", "--port", str(self.port), "--jobs-dir", str(self.jobs)],
            stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + SLOW
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log).read_text()
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the server did not start")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # as a crash would: no chance to mark the running job
            self.proc.wait(30)
        self.out.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-media")
    synth_portrait(str(d / "face.png"), width=96, height=96, seed=2)
    synth_voice(str(d / "voice.wav"), seconds=2.0, seed=2)          # 2 clips = 8 blocks
    with wave.open(str(d / "silent.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 32000)
    (d / "notes.png").write_text("not a picture")
    return d


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-screenshots")
    yield d
    print(f"\nscreenshots: {d}")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-server")
    s = Server(tiny_ckpt, d / "jobs", d / "server.log").start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS.split():
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="lowvram-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    from selenium.webdriver.chrome.service import Service

    b = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield b
    b.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(cond, what, timeout=SLOW, every=0.1):
    t = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        time.sleep(every)


def text(b, elem_id) -> str:
    els = b.find_elements(By.ID, elem_id)
    return els[0].text if els else ""


def open_page(b, server):
    b.get(server.url)
    wait(lambda: b.find_elements(By.ID, "generate") and "Plan:" in text(b, "plan"), "the page")


def upload(b, elem_id, path):
    wait(lambda: b.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"), f"the {elem_id} input")
    b.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def submit(b) -> str:
    before = b.find_element(By.CSS_SELECTOR, "#job-id textarea").get_attribute("value")
    b.find_element(By.ID, "generate").click()
    wait(lambda: "queued" in text(b, "message"), "the job to be queued")
    return wait(lambda: (v := b.find_element(By.CSS_SELECTOR, "#job-id textarea").get_attribute("value")) != before
                and v, "the job id")


def video_plays(b, elem_id) -> bool:
    """Play the element muted; True once its currentTime moves (the file is decodable and playable)."""
    js = f"const v = document.querySelector('#{elem_id} video'); if (!v) return null; v.muted = true; v.play(); " \
         "return [v.readyState, v.currentTime, v.error && v.error.code];"
    state = wait(lambda: b.execute_script(js), f"a video in #{elem_id}")
    assert state[2] is None, f"video error {state}"
    return bool(wait(lambda: (s := b.execute_script(js)) and s[0] >= 2 and s[1] > 0, f"#{elem_id} to play", 60))


def captions(b) -> list[str]:
    return b.execute_script("return Array.from(document.querySelectorAll('#gallery .caption-label'))"
                            ".map(c => c.textContent)")


def queue_row(b, job_id) -> str:
    rows = b.execute_script("return Array.from(document.querySelectorAll('#queue [role=row]')).map(r => r.innerText)")
    return next((r for r in rows if job_id in r), "")


def test_bad_uploads_show_a_readable_message_and_the_page_keeps_serving(server, browser, media, shots):
    open_page(browser, server)
    upload(browser, "portrait", media / "notes.png")
    msg = wait(lambda: "notes.png" in text(browser, "message") and text(browser, "message"), "the image message")
    assert "Pillow cannot open it as an image" in msg and "Traceback" not in browser.page_source
    browser.save_screenshot(str(shots / "1-bad-image.png"))
    upload(browser, "voice", media / "silent.wav")
    msg = wait(lambda: "silent.wav" in text(browser, "message") and text(browser, "message"), "the audio message")
    assert "is silent" in msg
    browser.find_element(By.ID, "generate").click()
    wait(lambda: "no portrait" in text(browser, "message"), "the missing-portrait message")
    browser.save_screenshot(str(shots / "2-bad-voice.png"))
    assert server.proc.poll() is None


def test_a_job_shows_preview_frames_before_it_ends_and_its_video_plays(server, browser, media, shots):
    open_page(browser, server)
    upload(browser, "portrait", media / "face.png")
    upload(browser, "voice", media / "voice.wav")
    wait(lambda: "voice.wav is usable" in text(browser, "message"), "the voice check")
    job = submit(browser)

    def preview_while_running():
        imgs = browser.find_elements(By.CSS_SELECTOR, "#preview img")
        src = imgs[0].get_attribute("src") if imgs else ""
        status = text(browser, "status")
        if "preview" in (src or "") and job in status and "block" in status:
            done, total = status.split("block ")[1].split()[0].split("/")
            return int(done) < int(total) and (int(done), int(total))
        return False

    done, total = wait(preview_while_running, "preview frames while the job runs", every=0.05)
    assert total == 8 and done < 8
    browser.save_screenshot(str(shots / "3-preview.png"))
    wait(lambda: "Idle" in text(browser, "status") and any(job in c for c in captions(browser)), "the job to finish")
    assert video_plays(browser, "latest")
    browser.save_screenshot(str(shots / "4-finished.png"))


def test_a_second_job_waits_and_cancel_keeps_a_playable_partial_video(server, browser, media, shots):
    first = submit(browser)                          # the form still holds the portrait and the voice
    second = submit(browser)
    wait(lambda: first in text(browser, "status") and "queued" in queue_row(browser, second), "one running, one queued")
    browser.save_screenshot(str(shots / "5-queued.png"))
    browser.find_element(By.ID, "cancel-job").click()          # the job box holds the second job's id
    wait(lambda: "removed from the queue" in text(browser, "message"), "the queued job's cancel")
    wait(lambda: "cancelled" in queue_row(browser, second), "the cancelled row")
    wait(lambda: "block" in text(browser, "status") and "block 0/" not in text(browser, "status"), "a first block")
    browser.find_element(By.ID, "cancel").click()
    wait(lambda: "stopping after the block in flight" in text(browser, "message"), "the running job's cancel")
    wait(lambda: any(first in c and "[interrupted]" in c for c in captions(browser)), "the interrupted job in the gallery")
    job_box = browser.find_element(By.CSS_SELECTOR, "#job-id textarea")
    job_box.clear()
    job_box.send_keys(first)
    browser.find_element(By.ID, "show").click()
    wait(lambda: "interrupted" in text(browser, "job-json"), "the job's details")
    assert video_plays(browser, "job-video")
    browser.save_screenshot(str(shots / "6-cancelled.png"))


def test_a_restart_keeps_the_queue_and_the_gallery(server, browser, media, shots):
    running = submit(browser)
    waiting = submit(browser)
    wait(lambda: running in text(browser, "status") and "queued" in queue_row(browser, waiting), "one running, one queued")
    gallery_before = captions(browser)
    browser.save_screenshot(str(shots / "7-before-restart.png"))
    server.kill()
    server.start()
    open_page(browser, server)
    wait(lambda: waiting in text(browser, "queue") or waiting in text(browser, "status"), "the queued job after restart")
    wait(lambda: len(gallery_before) == 2 and set(gallery_before) <= set(captions(browser)), "the gallery after restart")
    killed = queue_row(browser, running) or next((c for c in captions(browser) if running in c), "")
    assert "interrupted" in killed                                    # it was running when the server died
    browser.save_screenshot(str(shots / "8-after-restart.png"))
    # one click re-runs a finished job: pick it in the gallery, then Re-run
    wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery button"), "gallery items")[-1].click()
    wait(lambda: "settings" in text(browser, "job-json") or "prompt" in text(browser, "job-json"), "the picked job")
    browser.find_element(By.ID, "rerun").click()
    wait(lambda: "re-run of" in text(browser, "message"), "the re-run")
    browser.save_screenshot(str(shots / "9-rerun.png"))
    assert server.proc.poll() is None
