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
