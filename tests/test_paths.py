"""--out naming an input is refused before any work, whatever name it goes by."""

import os

import pytest

from lowvram.errors import LowvramError
from lowvram.io.paths import pid_alive, refuse_clashing_outputs, refuse_out_as_input, same_path


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "voice.wav").write_bytes(b"RIFF voice")
    (tmp_path / "me.png").write_bytes(b"PNG portrait")
    (tmp_path / "ckpt").mkdir()
    return {"--audio": tmp_path / "voice.wav", "--image": tmp_path / "me.png", "--ckpt-dir": tmp_path / "ckpt",
            "--lora": None}


def test_every_name_of_an_input_is_refused(tmp_path, inputs):
    os.symlink(tmp_path / "voice.wav", tmp_path / "soft.mp4")
    os.link(tmp_path / "me.png", tmp_path / "hard.mp4")
    (tmp_path / "sub").mkdir()
    cases = {
        tmp_path / "voice.wav": "--audio",
        tmp_path / "sub" / ".." / "voice.wav": "--audio",
        tmp_path / "soft.mp4": "--audio",  # a symlink to the voice
        tmp_path / "hard.mp4": "--image",  # a hard link to the portrait
        tmp_path / "ckpt": "--ckpt-dir",
    }
    for out, option in cases.items():
        with pytest.raises(LowvramError) as e:
            refuse_out_as_input(out, inputs)
        msg = str(e.value)
        assert f"is the same {'directory' if option == '--ckpt-dir' else 'file'} as the input {option}" in msg
        assert "choose another --out" in msg and "\n" not in msg
    assert (tmp_path / "voice.wav").read_bytes() == b"RIFF voice"


def test_other_outputs_pass(tmp_path, inputs):
    (tmp_path / "old.mp4").write_bytes(b"an older video")
    for out in (tmp_path / "new.mp4", tmp_path / "old.mp4", tmp_path / "ckpt" / "out.mp4"):
        refuse_out_as_input(out, inputs)
    refuse_out_as_input(tmp_path / "q", inputs, directory=True)


def test_a_directory_output_may_not_hold_an_input(tmp_path, inputs):
    with pytest.raises(LowvramError, match=r"--out .* contains the input --audio .*voice.wav; replacing it"):
        refuse_out_as_input(tmp_path, inputs, directory=True)
    refuse_out_as_input(tmp_path, {"--audio": inputs["--audio"]}, directory=False)  # a file output: not replaced


def test_outputs_against_each_other_and_pids(tmp_path):
    assert same_path(tmp_path / "a.mp4", tmp_path / "." / "a.mp4")  # neither exists: by name
    assert not same_path(tmp_path / "a.mp4", tmp_path / "b.mp4")
    with pytest.raises(LowvramError, match=r"--out .*x.mp4 and --report .*x.mp4 name the same file"):
        refuse_clashing_outputs({"--out": tmp_path / "x.mp4", "--report": tmp_path / "sub" / ".." / "x.mp4"})
    refuse_clashing_outputs({"job 1 --out": tmp_path / "a.mp4", "job 2 --out": tmp_path / "b.mp4", "--report": None})
    assert pid_alive(os.getpid()) and not pid_alive(0)
