"""One error style, the right exit code for each caller, and --help that says what is true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from mailbox_relay.cli import COMMANDS, FOR_PEOPLE
from mailbox_relay.outcome import DELIVER_EXITS, EXIT_MAPS, QMAIL, SYSEXITS

from .helpers import invoke

# A usage error each command can make; every one is a command people run, so 64.
PEOPLE = {
    "import": ["import", "--job", "2", "x.mbox"],
    "check": ["check", "--timout", "3"],
    "fetch": ["fetch", "--acount", "x"],
    "watch": ["watch", "--shard", "3/2"],
    "status": ["status", "--jsn"],
    "auth": ["auth"],
    "serve": ["serve", "--port", "http"],
    "migrate": ["migrate", "procmailrc", "x"],
}


def test_every_command_people_run_is_covered() -> None:
    assert set(PEOPLE) == set(FOR_PEOPLE) == set(COMMANDS) - {"deliver"}


@pytest.mark.parametrize("command", sorted(PEOPLE))
def test_a_usage_error_of_a_command_people_run_is_one_line_and_64(
    clean_env: Dict[str, str], command: str
) -> None:
    code, out, err = invoke(PEOPLE[command])
    assert (code, out) == (64, ""), err
    assert err.startswith("mailbox-relay: error: ") and err.count("\n") == 1, err
    assert f"see `mailbox-relay {command} --help`" in err


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["import", "--job", "2", "x"], "(did you mean '--jobs' or '--json'?)"),
        (["check", "--timout", "3"], "(did you mean '--timeout'?)"),
        (["imprt"], "no such command 'imprt' (did you mean 'import'?)"),
        (["serv"], "(did you mean 'serve'?)"),
        (["deliver", "--verbos"], "(did you mean '--verbose'?)"),
    ],
)
def test_a_mistyped_command_or_option_gets_a_did_you_mean(
    clean_env: Dict[str, str], args: List[str], suggestion: str
) -> None:
    assert suggestion in invoke(args)[2]


@pytest.mark.parametrize("args", [[], ["imprt"], ["help"], ["--bogus"]])
def test_the_top_level_defers_a_usage_error_in_the_human_style_and_says_so(
    clean_env: Dict[str, str], args: List[str]
) -> None:
    code, out, err = invoke(args)
    assert (code, out) == (75, "")
    assert err.startswith("mailbox-relay: error: ") and err.count("\n") == 1, err
    assert "exit 75, temporary, so a mail program that ran this keeps the message" in err
    code, _, err = invoke(args, env={"MAILBOX_RELAY_EXIT_CODES": "qmail"})
    assert code == 111 and "exit 111, temporary" in err


def test_deliver_keeps_the_mta_style_and_says_why_it_is_temporary(clean_env: Dict[str, str]) -> None:
    code, _, err = invoke(["deliver", "--verbos"])
    assert code == 75 and err.startswith("4.3.5 usage error: no such option '--verbos'")
    assert "exit 75, temporary" in err and err.count("\n") == 1


def test_status_of_an_unknown_account_speaks_to_a_person(clean_env: Dict[str, str]) -> None:
    code, out, err = invoke(["status", "--account", "nosuch"])
    assert (code, out) == (78, "")
    assert err.startswith("mailbox-relay: error: ") and "4.3.5" not in err, err


def helps() -> Dict[str, str]:
    texts = {"": invoke(["--help"])[1]}
    for command in COMMANDS:
        code, out, err = invoke([command, "--help"])
        assert code == 0, err
        texts[command] = out
    return texts


def test_help_says_what_is_true_for_each_command(clean_env: Dict[str, str]) -> None:
    texts = helps()
    assert "--failed-dir" not in texts["status"] and "--max-tries" not in texts["status"]
    for command, text in texts.items():
        assert "for deliver" not in text, command
        # One placeholder style: what the value is (SECONDS, PORT, DIR), never click's type name.
        assert not re.search(r"\b(INTEGER|FLOAT|RANGE|DIRECTORY|FILENAME|BOOLEAN)\b", text), command
        if command in FOR_PEOPLE:
            assert re.search(r"Exit codes.*:\n(.*\n)*\s+64  usage error", text), command
    top = " ".join(texts[""].split())
    assert "usage error exits 75, a temporary failure" in top and "must defer mail, not bounce it" in top
    assert "usage errors" in texts["deliver"]


def test_shell_completion_completes_commands(clean_env: Dict[str, str]) -> None:
    env = {
        **os.environ,
        "_MAILBOX_RELAY_COMPLETE": "bash_complete",
        "COMP_WORDS": "mailbox-relay imp",
        "COMP_CWORD": "1",
    }
    script = "import sys; from mailbox_relay.cli import main; sys.argv[0] = 'mailbox-relay'; main()"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"plain,import" in result.stdout, result.stdout


BROKEN_CONFIG = {  # each command people run, with a config file that has an unknown key
    "import": ["import", "x.mbox"],
    "check": ["check"],
    "fetch": ["fetch"],
    "watch": ["watch"],
    "status": ["status"],
    "auth": ["auth", "box"],
    "serve": ["serve", "--port", "0"],
}


@pytest.mark.parametrize("command", sorted(BROKEN_CONFIG))
def test_a_config_error_exits_78_from_every_command_people_run(
    clean_env: Dict[str, str], tmp_path: Path, command: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('url = "http://127.0.0.1:9"\npassword = "pw"\nno_such_key = 1\n')
    code, out, err = invoke([*BROKEN_CONFIG[command], "--config", str(config)])
    said = out + err  # check reports on stdout, as a failed step
    assert code == 78, said
    assert "unknown key 'no_such_key'" in said and "4.3.5" not in said, said


def test_deliver_and_the_top_level_keep_75_for_a_config_error(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("no_such_key = 1\n")
    code, _, err = invoke(["deliver", "--config", str(config)], stdin=b"From: a@b\n\nhi\n")
    assert code == 75 and err.startswith("4.3.5 unknown key 'no_such_key'"), err


@pytest.mark.parametrize("command", sorted(EXIT_MAPS))
def test_every_exit_code_table_in_help_is_outcomes_map(clean_env: Dict[str, str], command: str) -> None:
    text = invoke([command, "--help"])[1]
    listed = [int(code) for code in re.findall(r"^\s+(\d+)  \S", text.split("Exit codes")[1], re.M)]
    assert listed == [int(code) for code, _ in EXIT_MAPS[command]]
    for code, meaning in EXIT_MAPS[command]:
        assert f"{int(code):>2}  {meaning.split()[0]}" in text


def test_deliver_help_shows_both_conventions_from_outcome(clean_env: Dict[str, str]) -> None:
    text = invoke(["deliver", "--help"])[1]
    for kind, meaning, _ in DELIVER_EXITS:
        assert re.search(rf"{re.escape(meaning)}\s+{int(SYSEXITS[kind])}\s+{int(QMAIL[kind])}\b", text), (
            meaning
        )
