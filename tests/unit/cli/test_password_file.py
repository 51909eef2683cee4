"""A password file's first line is the password, ended by a newline only: the same password
typed at the prompt (getpass) and read from a file must be the same string."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvx_dr.cli.context import read_password_file
from dvx_dr.errors import UserError


@pytest.mark.parametrize("password", [
    "first-part\x85second-part", "first-part\u2028second-part", "correct-horse\x0cbattery",
    "tab\there and\x0bthere", "plain ascii password",
])
@pytest.mark.parametrize("ending", ["", "\n", "\r\n", "\nsecond line ignored\n"])
def test_the_first_line_is_the_whole_password(tmp_path: Path, password: str,
                                              ending: str) -> None:
    path = tmp_path / "password"
    path.write_bytes((password + ending).encode())
    assert read_password_file(path) == password


@pytest.mark.parametrize("text", ["", "\n", "\r\n", "\nthe password on line two\n"])
def test_an_empty_first_line_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "password"
    path.write_bytes(text.encode())
    with pytest.raises(UserError, match="is empty"):
        read_password_file(path)


def test_a_lone_carriage_return_ends_the_password(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"old-mac-password\rnot part of it")
    assert read_password_file(path) == "old-mac-password"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_file_others_may_read_or_change_is_warned_about_once(
        tmp_path: Path, mode: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"password-{mode:o}"
    path.write_text("a long enough password\n")
    path.chmod(mode)
    assert read_password_file(path) == "a long enough password"
    assert read_password_file(path) == "a long enough password"
    err = capsys.readouterr().err
    assert err == (f"dvx-dr: warning: password file {path} can be read or changed by other "
                   f"users (mode {mode:04o}); make it private with 'chmod 600 {path}'\n")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_file_is_read_without_a_word(tmp_path: Path, mode: int,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "password"
    path.write_text("a long enough password\n")
    path.chmod(mode)
    assert read_password_file(path) == "a long enough password"
    assert capsys.readouterr().err == ""


def test_a_pipe_is_not_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o666)

    def feed() -> None:
        with open(fifo, "w") as f:
            f.write("from a pipe password\n")

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert read_password_file(fifo) == "from a pipe password"
    finally:
        writer.join()
    assert capsys.readouterr().err == ""
