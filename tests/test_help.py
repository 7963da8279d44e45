"""``upload-proxy --help`` and every command's help are written for users: plain text,
no reStructuredText markup or notes about the code's structure."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

COMMANDS = ("sign", "hash-token", "tus-id", "upload", "install-service")
# reST roles and literals, and the module docstring's developer shorthand.
NOT_FOR_USERS = re.compile(r"``|:(?:mod|class|func|data|meth):|argv ->|-> config")


def help_text(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_is_written_for_users(command: str) -> None:
    text = help_text(*([command] if command else []))
    assert not NOT_FOR_USERS.search(text), text
    assert "usage: upload-proxy" in text


def test_top_level_help_lists_every_command_and_examples() -> None:
    text = help_text()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command
    assert "examples:" in text and "upload-proxy upload" in text
