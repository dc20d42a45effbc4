"""A killed `lowvram demo` leaves its temporary folder; the next demo removes it (and nothing else)."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from lowvram.demo.workdir import PREFIX, STALE_AFTER_S, clean_stale_demo_dirs, demo_workdir

_DEMO = textwrap.dedent("""
    import time
    from lowvram.demo.workdir import demo_workdir
    with demo_workdir() as d:
        (d / "portrait.png").write_bytes(b"x" * 100)
        print(d, flush=True)
        time.sleep(60)
""")


def test_a_killed_demo_folder_is_removed_and_a_running_one_kept(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", _DEMO], stdout=subprocess.PIPE, text=True, env=env)
    killed = proc.stdout.readline().strip()
    assert killed.startswith(str(tmp_path / PREFIX))
    assert clean_stale_demo_dirs(tmp_path) == []  # still running: its lock is held
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(killed)  # SIGKILL: no cleanup ran

    old_tmp = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        with demo_workdir() as running:
            assert [str(p) for p in clean_stale_demo_dirs(tmp_path)] == [killed]
            assert running.is_dir()  # ours, locked: kept
        assert not running.exists()  # a normal exit removes it as TemporaryDirectory does
    finally:
        tempfile.tempdir = old_tmp


def test_unlocked_folders_go_by_age_and_others_are_never_touched(tmp_path):
    fresh, old = tmp_path / f"{PREFIX}fresh", tmp_path / f"{PREFIX}old"
    for d in (fresh, old):
        d.mkdir()
        (d / "voice.wav").write_bytes(b"RIFF")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old / "voice.wav", (past, past))
    os.utime(old, (past, past))
    other = tmp_path / "someone-else"
    other.mkdir()
    os.utime(other, (past, past))
    (tmp_path / f"{PREFIX}link").symlink_to(other)
    (tmp_path / f"{PREFIX}file").write_text("not a folder")
    if os.geteuid() == 0:
        theirs = tmp_path / f"{PREFIX}theirs"
        theirs.mkdir()
        os.utime(theirs, (past, past))
        os.chown(theirs, 54321, -1)
    assert clean_stale_demo_dirs(tmp_path) == [old]
    assert fresh.is_dir() and other.is_dir() and (tmp_path / f"{PREFIX}link").is_symlink()
    assert (tmp_path / f"{PREFIX}file").is_file()
    if os.geteuid() == 0:
        assert theirs.is_dir()
