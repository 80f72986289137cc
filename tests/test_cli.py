"""The command line answers --help and --version without a traceback."""

from __future__ import annotations

import pytest

import scp

from conftest import run_cli


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sortscp {scp.__version__}", result.stdout


@pytest.mark.parametrize("command", ["serve", "sort", "echo"])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage:" in result.stdout and command in result.stdout, result.stdout


def test_no_arguments_lists_the_commands() -> None:
    result = run_cli(timeout=60)
    out = result.stdout + result.stderr
    for command in ("serve", "sort", "echo"):
        assert command in out, out
