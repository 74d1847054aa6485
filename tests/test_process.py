"""What only a real process shows: the installed entry point, binary stdin, exit codes, silence,
signals, and what the deliver path imports (every delivered message pays for it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from pytest_httpserver import HTTPServer

from .conftest import SAMPLE
from .helpers import RELAY_PATH as PATH
from .peers import RawServer


def entry_points() -> List[List[str]]:
    points = [[sys.executable, "-m", "mailbox_relay"]]
    script = shutil.which("mailbox-relay")
    if script:
        points.append([script])
    return points


def relay_env(clean_env: Dict[str, str], url: str) -> Dict[str, str]:
    return {**clean_env, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": "pw"}


def test_the_console_script_is_installed() -> None:
    assert shutil.which("mailbox-relay"), "pip install -e . puts mailbox-relay on PATH"


@pytest.mark.parametrize("command", entry_points(), ids=lambda c: os.path.basename(c[-1]))
def test_binary_stdin_delivered_byte_exact_and_silent(
    command: List[str], clean_env: Dict[str, str], httpserver: HTTPServer
) -> None:
    httpserver.expect_request(PATH, method="POST").respond_with_data("", status=204)
    envelope = b"From alice@example.com Mon Jan  1 00:00:00 2024\n"
    result = subprocess.run(
        [*command, "deliver"],
        input=envelope + SAMPLE,
        env=relay_env(clean_env, httpserver.url_for(PATH)),
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    ((request, _),) = httpserver.log
    assert request.get_data() == SAMPLE


@pytest.mark.parametrize(
    ("status", "code", "qmail_code"), [(500, 75, 111), (401, 75, 111), (404, 75, 111), (302, 75, 111)]
)
def test_real_exit_codes(
    clean_env: Dict[str, str], httpserver: HTTPServer, status: int, code: int, qmail_code: int
) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=status, headers={"Location": "https://x/"})
    env = {**relay_env(clean_env, httpserver.url_for(PATH)), "MAILBOX_RELAY_RETRY_FOR": "0"}
    for style, expected in (("sysexits", code), ("qmail", qmail_code)):
        result = subprocess.run(
            [sys.executable, "-m", "mailbox_relay", "deliver", "--exit-codes", style],
            input=SAMPLE,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == expected
        assert result.stdout == b""
        assert result.stderr.decode().startswith("4.") and result.stderr.count(b"\n") == 1


def test_invalid_message_exit_65_from_the_process(clean_env: Dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "deliver"],
        input=b"\x00\x01 not mail",
        env=relay_env(clean_env, "http://127.0.0.1:9/x"),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 65
    assert result.stderr.startswith(b"5.6.0 not an RFC 822 message")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_delivery_exits_75(clean_env: Dict[str, str], signame: str) -> None:
    with RawServer(["stall"]) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailbox_relay", "deliver", "--timeout", "30"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=relay_env(clean_env, server.url),
        )
        assert process.stdin is not None
        process.stdin.write(SAMPLE)
        process.stdin.close()
        assert server.accepted.wait(30), "deliver never connected"
        time.sleep(0.2)
        process.send_signal(getattr(signal, signame))
        process.wait(timeout=30)
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout.read(), process.stderr.read()
    assert process.returncode == 75
    assert stdout == b""
    assert stderr.decode().startswith(f"4.3.0 interrupted by {signame} before the ingress confirmed")


def test_the_deliver_path_imports_nothing_heavy(clean_env: Dict[str, str], httpserver: HTTPServer) -> None:
    """rich, TOML, sqlite3, http.server and the import machinery are not for `deliver`."""
    httpserver.expect_request(PATH).respond_with_data("", status=204)
    probe = (
        "import sys\n"
        "from mailbox_relay.cli import run\n"
        "code = run(['deliver'])\n"
        "heavy = {'rich', 'tomllib', 'tomli', 'sqlite3', 'http.server', 'mailbox', 'gzip', 'concurrent',\n"
        "         'multiprocessing', 'difflib', 'mailbox_relay.importer', 'imapclient', 'imaplib',\n"
        "         'mailbox_relay.cli.import_', 'mailbox_relay.cli.check', 'mailbox_relay.cli.serve',\n"
        "         'mailbox_relay.cli.fetch', 'mailbox_relay.fetch.once', 'mailbox_relay.sources.imap',\n"
        "         'mailbox_relay.cli.auth', 'mailbox_relay.sources.oauth2', 'poplib',\n"
        "         'mailbox_relay.sources.pop3', 'mailbox_relay.cli.migrate', 'mailbox_relay.migrate',\n"
        "         'prometheus_client', 'mailbox_relay.logformat', 'mailbox_relay.notify',\n"
        "         'mailbox_relay.fetch.metrics', 'mailbox_relay.fetch.listen',\n"
        "         'mailbox_relay.fetch.health', 'mailbox_relay.fetch.operate'}\n"
        "print(code, sorted(name for name in sys.modules if name.split('.')[0] in heavy or name in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        input=SAMPLE,
        capture_output=True,
        timeout=60,
        env=relay_env(clean_env, httpserver.url_for(PATH)),
    )
    assert result.stdout.decode().split(" ", 1) == ["0", "[]\n"], result.stderr.decode()


def run_with_a_gone_reader(args: List[str], env: Dict[str, str], stream: str, stdin: bytes = SAMPLE) -> int:
    """Run with stdout or stderr a pipe whose reader has already gone (EPIPE on the first write)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mailbox_relay", *args],
            input=stdin,
            env=env,
            timeout=60,
            **{stream: write_end, "stdout" if stream == "stderr" else "stderr": subprocess.DEVNULL},
        )
    finally:
        os.close(write_end)
    return result.returncode


@pytest.mark.parametrize("style", ["sysexits", "qmail"])
def test_a_reader_gone_from_stderr_never_changes_the_exit_code(clean_env: Dict[str, str], style: str) -> None:
    env = {**relay_env(clean_env, "http://127.0.0.1:9/x"), "MAILBOX_RELAY_RETRY_FOR": "0"}
    temporary, permanent = (75, 65) if style == "sysexits" else (111, 100)
    args = ["deliver", "--exit-codes", style]
    assert run_with_a_gone_reader(args, env, "stderr") == temporary  # connection refused
    assert run_with_a_gone_reader(args, env, "stderr", stdin=b"not mail") == permanent
    assert run_with_a_gone_reader([*args, "--bogus"], env, "stderr") == temporary  # a usage error


def test_a_reader_gone_from_stdout_never_changes_the_exit_code(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    env = relay_env(clean_env, "http://127.0.0.1:9/x")
    assert run_with_a_gone_reader(["check", "--json"], env, "stdout") == 69
    assert run_with_a_gone_reader(["check"], env, "stdout") == 69
    mbox = tmp_path / "in.mbox"
    mbox.write_bytes(b"From a@b Mon Jan  1 00:00:00 2024\n" + SAMPLE)
    assert run_with_a_gone_reader(["import", "--dry-run", "--json", str(mbox)], env, "stdout") == 0


def test_stdin_closed_is_a_temporary_failure_in_one_line(clean_env: Dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "deliver"],
        env=relay_env(clean_env, "http://127.0.0.1:9/x"),
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=60,
    )
    assert result.returncode == 75
    assert result.stderr == b"4.3.5 no message: stdin is closed; pipe the message in, or name a FILE\n"
