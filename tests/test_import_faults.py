"""import against broken archives, moving files, wrong settings and signals: it never aborts on
one bad item, never leaves processes behind, and stops early when every message would fail."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from pytest_httpserver import HTTPServer

from .corpus import mbox_bytes, message, stored, write_eml_tree, write_maildir, write_mbox
from .helpers import RELAY_PATH, import_process, invoke, journal_rows, wait_for
from .peers import Ingress204, free_port


def summary(args: List[str], env: Dict[str, str] = {}) -> tuple[int, Dict[str, object]]:  # noqa: B006
    code, out, err = invoke(["import", "--json", *args], env={"MAILBOX_RELAY_PASSWORD": "pw", **env})
    assert out, err
    return code, json.loads(out)


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state.sqlite3")


def cut_gzip(path: Path, messages: List[bytes], keep: float) -> Path:
    data = gzip.compress(mbox_bytes(messages))
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gz_delivers_what_came_before_the_cut_and_says_where(
    tmp_path: Path, clean_env: Dict[str, str], state: str, damage: str
) -> None:
    messages = [message(n, body=os.urandom(3000).hex().encode()) for n in range(60)]
    if damage == "truncated":
        archive = cut_gzip(tmp_path / "takeout.mbox.gz", messages, 0.5)
    else:
        data = bytearray(gzip.compress(mbox_bytes(messages)))
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        archive = tmp_path / "takeout.mbox.gz"
        archive.write_bytes(bytes(data))
    good = write_mbox(tmp_path / "other.mbox", [message(100)])
    with Ingress204() as ingress:
        args = ["--url", ingress.url, "--state", state, str(archive), str(good)]
        code, report = summary(args)
        assert code == 66, report
        delivered = int(report["delivered"])  # type: ignore[call-overload]
        assert 0 < delivered < 61 and report["failed"] == 0
        assert all(body in [*messages, message(100)] for body in ingress.bodies)  # none cut short
        assert message(100) in ingress.bodies  # the next input was read
        (problem,) = report["damaged_inputs"]  # type: ignore[misc]
        assert problem["path"] == str(archive) and problem["offset"] > 0
        assert journal_rows(state) == delivered
        code, text, _ = invoke(["import", *args], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 66 and len(ingress.bodies) == delivered  # the rerun re-posted nothing
    assert f"input {archive}: damaged after" in text


def test_a_file_that_vanishes_mid_run_is_counted_and_the_rest_flows(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    total = 400
    maildir = write_maildir(tmp_path / "Maildir", [message(n) for n in range(total)])
    with Ingress204(delay=0.01) as ingress:
        args = ["--url", ingress.url, "--state", state, "--jobs", "1", "--json", str(maildir)]
        process = import_process(args, clean_env)
        wait_for(lambda: len(ingress.bodies) >= 5)
        moved = 0
        for path in sorted((maildir / "new").iterdir())[-50:]:  # an MUA marks them read
            path.rename(maildir / "cur" / (path.name + ":2,S"))
            moved += 1
        out, err = process.communicate(timeout=120)
        report = json.loads(out)
        assert process.returncode == 66, err
        assert report["unreadable"] == moved and report["delivered"] == total - moved
        assert all("cannot read" in failure["reason"] for failure in report["failures"])
        code, again = summary(["--url", ingress.url, "--state", state, str(maildir)])
    assert (code, again["delivered"], again["already_delivered"]) == (0, moved, total - moved)


def test_broken_links_and_non_utf8_names_are_items_not_aborts(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    tree = write_eml_tree(tmp_path / "export", [message(n) for n in range(3)])
    (tree / "broken.eml").symlink_to(tmp_path / "nowhere.eml")
    odd = os.fsdecode(bytes(tree / "folder0") + b"/caf\xe9.eml")
    Path(odd).write_bytes(message(50))
    with Ingress204() as ingress:
        args = ["--url", ingress.url, "--state", state, str(tree)]
        code, report = summary(args)
        assert code == 66 and (report["delivered"], report["unreadable"]) == (4, 1)
        assert message(50) in ingress.bodies
        code, text, _ = invoke(["import", *args], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 66 and "1 unreadable" in text and "3 already delivered" not in text
    assert "4 already delivered" in text


def test_a_date_out_of_any_range_is_undated_not_a_crash(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    huge = message(0, date="Mon, 1 Jan 99999999999999999999 00:00:00 +0000")
    mbox = write_mbox(tmp_path / "in.mbox", [huge, message(1, date="Mon, 01 Jan 2024 10:00:00 +0000")])
    code, report = summary(["--dry-run", "--since", "2020-01-01", "--until", "2030-01-01", str(mbox)])
    assert (code, report["delivered"]) == (0, 2)


def test_an_empty_mbox_is_an_empty_input(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    empty = tmp_path / "empty.mbox"
    empty.write_bytes(b"")
    mbox = write_mbox(tmp_path / "in.mbox", [message(0)])
    code, report = summary(["--dry-run", str(empty), str(mbox)])
    assert (code, report["messages"], report["delivered"]) == (0, 1, 1)
    assert report["sources"][0] == {"path": str(empty), "kind": "empty file"}  # type: ignore[index]


def test_a_folder_of_mboxes_and_maildirs_is_walked(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    root = tmp_path / "archive"
    write_mbox(root / "Takeout" / "Inbox.mbox", [message(0), message(1)]) if (root / "Takeout").mkdir(
        parents=True
    ) is None else None
    write_mbox(root / "Sent.mbox.gz", [message(2)], gz=True)
    write_maildir(root / "Work", [message(3), message(4)])
    write_eml_tree(root / "loose", [message(5)])
    (root / "notes.txt").write_text("not mail")
    code, report = summary(["--dry-run", str(root)])
    assert (code, report["messages"], report["delivered"]) == (0, 6, 6), report
    kinds = sorted(source["kind"] for source in report["sources"])  # type: ignore[attr-defined,index]
    assert kinds == [".eml files", "Maildir", "mbox", "mbox"]


def test_a_path_that_is_no_input_is_named_and_the_others_still_run(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(0)])
    code, report = summary(["--dry-run", str(tmp_path / "missing.mbox"), str(mbox)])
    assert (code, report["delivered"]) == (66, 1)
    assert "no such file" in report["damaged_inputs"][0]["problem"]  # type: ignore[index]


@pytest.mark.parametrize("status", [401, 403, 404, 415, 301])
def test_an_answer_every_message_would_get_stops_the_run_early(
    httpserver: HTTPServer, tmp_path: Path, clean_env: Dict[str, str], state: str, status: int
) -> None:
    httpserver.expect_request(RELAY_PATH).respond_with_data("", status=status, headers={"Location": "/x"})
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(2000)])
    url = httpserver.url_for(RELAY_PATH)
    code, out, _err = invoke(
        ["import", "--url", url, "--state", state, str(mbox)], env={"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert code == 75
    assert len(httpserver.log) <= 20, f"{len(httpserver.log)} posts"
    assert "stopped early, as every message would fail the same way: 4." in out
    assert "run the same command again to resume" in out
    assert journal_rows(state) == 0


@pytest.mark.parametrize("app", ["closed port", "unresolvable host"])
def test_an_app_that_is_not_there_stops_the_run_on_the_first_messages_without_retrying(
    tmp_path: Path, clean_env: Dict[str, str], state: str, app: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}" if app == "closed port" else "https://no-such-app.invalid"
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(200)])
    # --retry-for 3600: had a message been retried, this run would last an hour.
    args = ["--url", url, "--state", state, "--retry-for", "3600", "--jobs", "2", "--json", str(mbox)]
    code, out, err = invoke(["import", *args], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    report = json.loads(out)
    assert code == 75, err
    assert "4.4.1 " in str(report["stopped"]), report
    assert ("connection refused" if app == "closed port" else "cannot resolve") in str(report["stopped"])
    assert "attempts over" not in out  # one attempt each: nothing was waited for
    assert int(report["failed"]) < 200 and report["delivered"] == 0  # type: ignore[call-overload]
    assert journal_rows(state) == 0


def test_an_app_that_answered_once_is_waited_for_when_it_refuses_later(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    """Refused after the app answered is an app restarting: retried within --retry-for."""
    from mailbox_relay import workers
    from mailbox_relay.ingress.target import Target

    port = free_port()
    workers._Worker.settings = Target(
        {"url": f"http://127.0.0.1:{port}", "retry_for": 2.0}, password="pw", environ={}
    )
    workers._Worker.pacer = workers.AdaptiveConcurrency(1)
    workers._Worker.session = None
    try:
        workers._Worker.reached = False
        first, _ = workers.deliver_batch([message(0)])
        assert "attempts over" not in first[0].detail, first[0].detail
        workers._Worker.reached = True
        later, _ = workers.deliver_batch([message(0)])
        assert "attempts over" in later[0].detail, later[0].detail
    finally:
        workers._Worker.reached = False
        workers._Worker.session = None


def test_no_worker_outlives_a_kill_9_of_the_import(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(300)])
    with Ingress204(delay=0.05) as ingress:
        process, token = marked_import(
            ["--url", ingress.url, "--no-state", "--jobs", "3", str(mbox)], clean_env
        )
        wait_for(lambda: len(ingress.bodies) >= 5)
        assert len(processes_with(token)) >= 3
        process.kill()
        process.wait(10)
        wait_for(lambda: not processes_with(token), seconds=15)


def test_sigterm_to_the_process_group_gives_a_summary_and_no_orphans(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(300)])
    with Ingress204(delay=0.02) as ingress:
        args = ["--url", ingress.url, "--state", state, "--jobs", "3", str(mbox)]
        process, token = marked_import(args, clean_env, start_new_session=True)
        wait_for(lambda: len(ingress.bodies) >= 10)
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        delivered = len(ingress.bodies)
    assert process.returncode == 75, err
    assert b"interrupted: run the same command again to resume" in out
    assert b"internal error" not in out + err and b"Traceback" not in err
    assert journal_rows(state) == delivered
    wait_for(lambda: not processes_with(token), seconds=15)


def marked_import(
    args: List[str], clean_env: Dict[str, str], **popen: Any
) -> Tuple[subprocess.Popen[bytes], str]:
    """An import process whose every descendant carries a fresh token, to find them later."""
    token = uuid.uuid4().hex
    return import_process(args, {**clean_env, "MAILBOX_RELAY_TEST_TOKEN": token}, **popen), token


def processes_with(token: str) -> List[int]:
    """Processes (import, its workers, multiprocessing's resource tracker) that carry `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"MAILBOX_RELAY_TEST_TOKEN={token}".encode() in environ:
                found.append(int(entry))
    return found


def test_usage_errors_exit_64(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = str(write_mbox(tmp_path / "in.mbox", [message(0)]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": "http://127.0.0.1:9"}
    for args in (
        ["--jobs", "0"],
        ["--rate", "0"],
        ["--since", "last tuesday"],
        ["--state", str(blocker / "s")],
    ):
        code, _, err = invoke(["import", *args, mbox], env=env)
        assert code == 64, (args, err)
        errors = [line for line in err.splitlines() if line.startswith("mailbox-relay: error: ")]
        assert len(errors) == 1 and "4.3.5" not in err, err
    _, out, _ = invoke(["import", "--help"])
    assert "2024-01-31T12:00" in out  # the date forms --since takes


def test_the_text_summary_names_the_failed_dir_and_its_files(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(0), b"not a message\n\nbody\n"])
    failed = tmp_path / "failed"
    code, out, _ = invoke(
        ["import", "--dry-run", "--failed-dir", str(failed), str(mbox)], env={"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert code == 65
    (name,) = os.listdir(failed / "new")
    assert f"1 undelivered message written to {failed}/new:" in out
    assert name in out
    assert stored(str(failed)) == [b"not a message\n\nbody\n"]


@pytest.mark.parametrize("where", ["env", "config"])
def test_failed_dir_from_the_environment_or_the_config_file_counts_for_import(
    tmp_path: Path, clean_env: Dict[str, str], where: str
) -> None:
    """One failed_dir field for import, fetch and watch: import used to ignore all but the option."""
    mbox = write_mbox(tmp_path / "in.mbox", [message(0), b"not a message\n\nbody\n"])
    failed = tmp_path / "failed"
    config = tmp_path / "config.toml"
    config.write_text(f'failed_dir = "{failed}"\n' if where == "config" else "")
    env = {"MAILBOX_RELAY_FAILED_DIR": str(failed)} if where == "env" else {}
    code, _, err = invoke(["import", "--dry-run", "-v", "--config", str(config), str(mbox)], env=env)
    assert code == 65, err
    assert stored(str(failed)) == [b"not a message\n\nbody\n"]
    source = "env MAILBOX_RELAY_FAILED_DIR" if where == "env" else f"config {config}"
    assert f"failed_dir = '{failed}' ({source})" in err  # -v says where it came from


def test_an_unusable_failed_dir_is_a_usage_error_as_an_option_and_a_setting_otherwise(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(0)])
    (tmp_path / "file").write_text("x")
    unusable = str(tmp_path / "file" / "failed")
    code, _, err = invoke(["import", "--dry-run", "--failed-dir", unusable, str(mbox)])
    assert code == 64 and f"cannot use --failed-dir {unusable} as a Maildir" in err, err
    code, _, err = invoke(["import", "--dry-run", str(mbox)], env={"MAILBOX_RELAY_FAILED_DIR": unusable})
    assert code == 78 and f"cannot use failed_dir {unusable} (env MAILBOX_RELAY_FAILED_DIR)" in err, err


def test_a_short_run_shows_no_misleading_rate(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(5)])
    code, out, _ = invoke(["import", "--dry-run", str(mbox)], env={})
    assert code == 0 and out.startswith("5 messages in ") and "/s)" not in out


def test_progress_follows_delivery_not_reading(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    from mailbox_relay.import_summary import Summary
    from mailbox_relay.importer import Importer
    from mailbox_relay.settings import ImportSettings, MessageSettings
    from mailbox_relay.sources.files import detect
    from mailbox_relay.workers import start_workers

    from .helpers import make_settings

    class Recorder:
        def __init__(self) -> None:
            self.done: List[int] = []

        def update(self, summary: Summary, done_bytes: int, total_bytes: int) -> None:
            self.done.append(done_bytes)

        def close(self, summary: Summary) -> None:
            pass

    (source,) = detect(str(write_mbox(tmp_path / "in.mbox", [message(n) for n in range(30)])))
    recorder = Recorder()
    with Ingress204(delay=0.02) as ingress:
        pool = start_workers(make_settings(url=ingress.url, retry_for=0.0), 1, quiet=True)
        importer = Importer(ImportSettings({"jobs": 1}), MessageSettings({}), pool=pool, progress=recorder)
        result = importer.run([source])
    assert result.delivered == 30
    total = source.size()
    assert recorder.done == sorted(recorder.done)  # it never goes back
    assert recorder.done[0] < total / 2  # the whole file was read at once, but not yet delivered
    assert sum(1 for done in recorder.done if done < total) >= 10


def test_a_double_ctrl_c_leaves_no_worker_behind(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(300)])
    with Ingress204(delay=0.3) as ingress:
        args = ["--url", ingress.url, "--state", state, "--jobs", "3", str(mbox)]
        process, token = marked_import(args, clean_env)
        wait_for(lambda: len(ingress.bodies) >= 3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)  # the second abandons the posts in flight
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 75
    assert b"interrupted" in out
    wait_for(lambda: not processes_with(token), seconds=15)


@pytest.mark.parametrize(
    ("option", "value"), [("--rate", "0.0001"), ("--jobs", "65"), ("--timeout", "0.001")]
)
def test_values_that_would_hang_or_exhaust_the_machine_are_usage_errors(
    tmp_path: Path, clean_env: Dict[str, str], option: str, value: str
) -> None:
    mbox = str(write_mbox(tmp_path / "in.mbox", [message(0)]))
    code, _, err = invoke(
        ["import", option, value, "--url", "http://127.0.0.1:9", mbox], env={"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert code == 64 and "must be" in err


def test_a_signal_is_heard_while_the_rate_holds_the_import_back(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(10)])
    with Ingress204() as ingress:
        process = import_process(["--url", ingress.url, "--no-state", "--rate", "0.01", str(mbox)], clean_env)
        wait_for(lambda: len(ingress.bodies) >= 1)
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 75 and b"interrupted" in out
    assert time.monotonic() - started < 5


def test_a_maildir_that_vanishes_before_the_run_is_a_damaged_input(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    from mailbox_relay.importer import Importer
    from mailbox_relay.settings import ImportSettings, MessageSettings
    from mailbox_relay.sources.files import detect

    (source,) = detect(str(write_maildir(tmp_path / "Maildir", [message(0)])))
    shutil.rmtree(tmp_path / "Maildir")
    summary = Importer(ImportSettings({}), MessageSettings({}), pool=None).run([source])
    assert summary.exit_code() == 66 and summary.damaged[0]["problem"].startswith("cannot read it")
