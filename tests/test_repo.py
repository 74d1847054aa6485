"""The promises the repository makes to a newcomer: the README's commands are the real ones."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from mailbox_relay.cli import COMMANDS
from mailbox_relay.outcome import DELIVER_EXITS, EXIT_MAPS, QMAIL, SYSEXITS

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


def test_readme_quickstart_delivers_a_message() -> None:
    """The quick start, minus its venv install (this test runs installed): it stores the sample."""
    command = readme_block("quickstart")
    install, _, run = command.rpartition(" && ")
    assert install.startswith("python3 -m venv /tmp/mailbox-relay-try && ") and "pip install" in install
    assert run == 'PATH="/tmp/mailbox-relay-try/bin:$PATH" sh contrib/try-it.sh'
    result = subprocess.run(["sh", "contrib/try-it.sh"], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    listed = result.stdout.decode().splitlines()
    said = re.fullmatch(
        r"delivered; serve stored in (\S+)/Maildir/new \(removed when this script ends\):", listed[0]
    )
    assert said and len(listed) == 2, listed
    assert "mailbox-relay-try." in said.group(1) and not os.path.exists(said.group(1))


def test_the_quickstart_fails_loudly_when_delivery_fails(tmp_path: Path) -> None:
    """A broken step must not look like success (nor list a message left from an earlier run)."""
    fake = tmp_path / "mailbox-relay"  # serve works, deliver fails as it would on a wrong password
    real = shutil.which("mailbox-relay")
    assert real
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = deliver ]; then echo "4.7.0 rejected" >&2; exit 75; fi\nexec {real} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "contrib/try-it.sh"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert result.returncode == 75 and b"4.7.0 rejected" in result.stderr
    assert b"stored" not in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
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
        "fetchmailrc-multidrop.example",
        "procmailrc.example",
        "postfix-master.cf.example",
        "postfix-main.cf.example",
        "exim-router.example",
        "exim-transport.example",
        "try-it.sh",
        "qmail.example",
        "config.toml.example",
        "mailbox-relay-watch.service.example",
        "mailbox-relay-fetch.service.example",
        "mailbox-relay-fetch.timer.example",
        "prometheus.yml.example",
        "mailbox-relay.rules.yml.example",
        "sample.eml",
    ):
        assert (ROOT / "contrib" / name).is_file(), name
    assert 'arguments = ("deliver",)' in (ROOT / "contrib" / "getmailrc.example").read_text()


def test_every_contrib_example_says_what_it_needs_and_agrees_on_the_install() -> None:
    for path in sorted((ROOT / "contrib").glob("*.example")):
        text = path.read_text()
        assert "Needs:" in text or "mailbox-relay settings" in text, f"{path.name} does not say what it needs"
        for line in text.splitlines():
            if "mailbox-relay deliver" in line and not line.lstrip().startswith("#"):
                assert "/usr/local/bin/mailbox-relay deliver" in line, (path.name, line)
        if "multidrop" not in path.name:  # only there is %T an address (to * here, localdomains)
            assert "%T" not in "".join(line for line in text.splitlines() if not line.startswith("#"))


def test_the_leftover_check_sees_what_a_test_leaves(nothing_left_behind: str) -> None:
    """The session's check (conftest.py) would fail on a file left in TMPDIR or the repository."""
    import tempfile

    assert tempfile.gettempdir() != nothing_left_behind  # this process's own stays apart
    from .conftest import repo_leftovers, temp_leftovers

    assert os.environ["TMPDIR"] == nothing_left_behind
    before = repo_leftovers()
    inbox = ROOT / "mailbox-relay-inbox-leftover-probe"
    inbox.mkdir()  # empty, as serve's Maildir was: git would not list it
    stray = Path(nothing_left_behind) / "mailbox-relay-try.probe"
    stray.mkdir()
    try:
        assert repo_leftovers() - before == {inbox.name}
        assert temp_leftovers(nothing_left_behind) == [stray.name]
    finally:
        inbox.rmdir()
        stray.rmdir()
    assert repo_leftovers() == before and temp_leftovers(nothing_left_behind) == []


def test_readme_links_are_absolute_and_name_files_that_exist() -> None:
    """PyPI shows the README without the repository: relative links would break there."""
    base = "https://github.com/mailbox-relay/mailbox-relay/"
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links
    for link in links:
        assert link.startswith(("https://", "#")), link
        if link.startswith(base):
            path = link[len(base) :].split("/", 2)[2]  # blob/main/PATH or tree/main/PATH
            assert (ROOT / path).exists(), link


def _toml(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return f'"{value}"'


def account_keys_table() -> str:
    """The README's table of account keys, as the Fields of accounts.py declare them."""
    from mailbox_relay.accounts import ACCOUNT_FIELDS

    rows = ["| key | default | what |", "|---|---|---|"]
    for name, field in ACCOUNT_FIELDS.items():
        default = field.shown_default or ("" if field.default is None else f"`{_toml(field.default)}`")
        rows.append(f"| `{name}` | {default} | {field.help} |")
    return "\n".join(rows)


def test_the_readme_table_of_account_keys_is_the_fields() -> None:
    match = re.search(r"<!-- account-keys -->\n(.*?)\n<!-- /account-keys -->", README, re.S)
    assert match, "README.md has no <!-- account-keys --> table"
    assert match.group(1) == account_keys_table(), "regenerate it with tests/test_repo.py:account_keys_table"


def _readme_table(name: str) -> List[List[str]]:
    match = re.search(rf"<!-- exit-codes: {name} -->\n((?:\|.*\|\n)+)", README)
    assert match, f"README.md has no exit-code table for {name}"
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")] for line in match.group(1).splitlines()[2:]
    ]


@pytest.mark.parametrize("command", sorted(EXIT_MAPS))
def test_the_readme_exit_code_tables_are_outcomes_maps(command: str) -> None:
    assert _readme_table(command) == [[str(int(code)), meaning] for code, meaning in EXIT_MAPS[command]]


def test_the_readme_exit_codes_of_deliver_are_outcomes() -> None:
    rows = _readme_table("deliver")
    assert [(row[1], row[2]) for row in rows] == [
        (str(int(SYSEXITS[kind])), str(int(QMAIL[kind]))) for kind, _, _ in DELIVER_EXITS
    ]
