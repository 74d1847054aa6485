"""The promises the repository makes to a newcomer: the README's commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```(?:sh|bash)?\n(.*?)```", README, re.S)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = readme_block("test-command")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_ci_lints_and_type_checks() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ("ruff check .", "ruff format --check .", "mypy"):
        assert step in ci


def test_readme_quickstart_delivers_a_message(tmp_path: Path) -> None:
    """The quick start, minus its `pip install .` (this test runs installed)."""
    command = readme_block("quickstart")
    assert command.startswith("pip install . && ")
    command = command.removeprefix("pip install . && ").replace("/tmp/mailbox-relay-try", str(tmp_path))
    result = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    stored = list((tmp_path / "new").iterdir())
    assert len(stored) == 1
    assert stored[0].read_bytes() == (ROOT / "contrib" / "sample.eml").read_bytes()
    assert stored[0].name in result.stdout.decode()


@pytest.mark.parametrize("command", ["deliver", "import", "check", "serve"])
def test_every_option_is_in_the_readme(command: str) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"}:
        assert f"`{option}" in README or f"[{option}" in README, f"{command} {option} not in README.md"


def test_contrib_examples_exist() -> None:
    for name in (
        "getmailrc.example",
        "fetchmailrc.example",
        "procmailrc.example",
        "postfix-master.cf.example",
        "exim-transport.example",
        "qmail.example",
        "config.toml.example",
        "sample.eml",
    ):
        assert (ROOT / "contrib" / name).is_file(), name
    assert 'arguments = ("deliver",)' in (ROOT / "contrib" / "getmailrc.example").read_text()
