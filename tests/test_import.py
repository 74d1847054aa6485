"""`import` end to end: into `serve` and test ingresses, resume after kill -9, flaky 5xx, filters."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Dict, List

import pytest

from mailbox_relay.importer import BATCH_SECONDS

from .corpus import message, stored, write_eml_tree, write_maildir, write_mbox
from .helpers import import_process, invoke, journal_rows, wait_for
from .peers import Ingress204, LocalServe


def run_import(args: List[str], env: Dict[str, str]) -> tuple[int, str, str]:
    return invoke(["import", *args], stdin=b"", env={"MAILBOX_RELAY_PASSWORD": "pw", **env})


def summary(args: List[str], env: Dict[str, str]) -> tuple[int, Dict[str, object]]:
    code, out, err = run_import(["--json", *args], env)
    assert out, err
    return code, json.loads(out)


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state.sqlite3")


def test_mbox_into_serve_exact_bytes_then_a_rerun_sends_nothing(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    messages = [message(n) for n in range(50)]
    mbox = write_mbox(tmp_path / "in.mbox", messages)
    with LocalServe(str(tmp_path / "inbox")) as serve:
        code, report = summary(["--url", serve.base, "--state", state, str(mbox)], {})
        assert code == 0
        assert (report["messages"], report["delivered"], report["failed"]) == (50, 50, 0)
        assert stored(serve.maildir.path) == sorted(messages)
        posts = len(serve.lines)
        code, report = summary(["--url", serve.base, "--state", state, str(mbox)], {})
        assert (code, report["delivered"], report["already_delivered"]) == (0, 0, 50)
        assert len(serve.lines) == posts  # nothing was sent again
        code, report = summary(["--url", serve.base, "--state", state, "--restart", str(mbox)], {})
        assert (report["delivered"], len(serve.lines)) == (50, posts + 50)
        assert len(stored(serve.maildir.path)) == 50  # re-sent bytes are deduplicated, as in Rails


def test_maildir_and_eml_tree_in_one_run(tmp_path: Path, clean_env: Dict[str, str], state: str) -> None:
    maildir = write_maildir(tmp_path / "Maildir", [message(n) for n in range(7)])
    tree = write_eml_tree(tmp_path / "export", [message(n) for n in range(100, 105)])
    with LocalServe(str(tmp_path / "inbox")) as serve:
        code, out, err = run_import(["--url", serve.base, "--state", state, str(maildir), str(tree)], {})
        assert code == 0, err
        assert len(stored(serve.maildir.path)) == 12
    assert "reading as Maildir" in err and "reading as .eml files" in err
    assert "12 messages" in out and "12 delivered" in out


def test_a_flaky_ingress_ends_with_every_message_delivered(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    messages = [message(n) for n in range(24)]
    mbox = write_mbox(tmp_path / "in.mbox", messages)
    with Ingress204(fail_every=3) as ingress:  # every third post answers 500, like a busy Rails
        code, report = summary(["--url", ingress.url, "--state", state, "--jobs", "4", str(mbox)], {})
    assert code == 0, report
    assert report["delivered"] == 24 and report["failed"] == 0
    assert sorted(ingress.bodies) == sorted(messages)
    assert ingress.requests > 24


def test_failures_that_remain_exit_75_land_in_failed_dir_and_a_rerun_finishes(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    messages = [message(n) for n in range(6)]
    mbox = write_mbox(tmp_path / "in.mbox", messages)
    failed = tmp_path / "failed"
    with Ingress204(status=503) as ingress:
        args = ["--url", ingress.url, "--state", state, "--retry-for", "0", "--failed-dir", str(failed)]
        code, report = summary([*args, str(mbox)], {})
        assert code == 75
        assert report["failed"] == 6 and report["delivered"] == 0
        assert report["top_failure_reasons"][0]["reason"].startswith("4.3.0 ingress failed with HTTP 503")  # type: ignore[index]
        assert stored(str(failed)) == sorted(messages)
        ingress.status = 204
        code, report = summary([*args, str(mbox)], {})
    assert (code, report["delivered"]) == (0, 6)


def test_invalid_messages_are_65_and_saved(tmp_path: Path, clean_env: Dict[str, str], state: str) -> None:
    bad = b"this is not a header\n\nbody\n"
    mbox = write_mbox(tmp_path / "in.mbox", [message(0), bad, message(2)])
    with Ingress204() as ingress:
        code, report = summary(
            ["--url", ingress.url, "--state", state, "--failed-dir", str(tmp_path / "f"), str(mbox)], {}
        )
    assert code == 65
    assert (report["delivered"], report["invalid"]) == (2, 1)
    failure = report["failures"][0]  # type: ignore[index]
    assert "line 2 is not a header field" in failure["reason"]
    assert stored(str(tmp_path / "f")) == [bad]


def test_filters_on_labels_and_dates(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    messages = [
        message(0, labels="Inbox,Important", date="Mon, 01 Jan 2024 10:00:00 +0000"),
        message(1, labels="Spam", date="Mon, 01 Jan 2024 10:00:00 +0000"),
        message(2, labels='"Trash",Inbox', date="Fri, 01 Mar 2024 10:00:00 +0000"),
        message(3, labels="Chat", date="Sat, 01 Jun 2024 10:00:00 +0000"),
        message(4, labels="Inbox", date="not a date"),
    ]
    mbox = str(write_mbox(tmp_path / "takeout.mbox", messages))

    def delivered(*args: str) -> int:
        code, report = summary(["--dry-run", *args, mbox], {})
        assert code == 0
        assert report["messages"] == 5
        return int(report["delivered"])  # type: ignore[call-overload]

    assert delivered() == 5
    assert delivered("--exclude-label", "spam", "--exclude-label", "Trash", "--exclude-label", "Chat") == 2
    assert delivered("--label", "inbox") == 3
    assert delivered("--since", "2024-02-01") == 3  # March, June, and the undated one
    assert delivered("--since", "2024-02-01", "--until", "2024-04-01") == 2


def test_dry_run_needs_no_ingress_and_counts(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(0), b"garbage\n", message(2)])
    code, out, _ = invoke(["import", "--dry-run", str(mbox)], stdin=b"", env={})
    assert code == 65
    assert "3 messages" in out and "2 valid (would be delivered)" in out and "1 invalid" in out


def test_unreadable_input_and_bad_settings(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    assert run_import(["--url", "http://127.0.0.1:9", str(tmp_path / "nope.mbox")], {})[0] == 66
    mbox = write_mbox(tmp_path / "in.mbox", [message(0)])
    code, _, err = invoke(["import", str(mbox)], stdin=b"", env={})
    assert code == 78 and err.startswith("mailbox-relay: error: no ingress URL")
    assert invoke(["import"], stdin=b"", env={})[0] == 64
    assert invoke(["import", "--since", "yesterday", str(mbox)], stdin=b"", env={})[0] == 64


def test_no_state_sends_everything_again(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(3)])
    with Ingress204() as ingress:
        for _ in range(2):
            assert run_import(["--url", ingress.url, "--no-state", "-q", str(mbox)], {})[0] == 0
    assert len(ingress.bodies) == 6


def test_resume_after_kill_9_resends_at_most_what_was_in_flight(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    total, jobs = 200, 4
    messages = [message(n) for n in range(total)]
    mbox = write_mbox(tmp_path / "in.mbox", messages)
    with Ingress204(delay=0.02) as ingress:
        args = ["--url", ingress.url, "--state", state, "--jobs", str(jobs), "-q", str(mbox)]
        process = import_process(args, clean_env)
        wait_for(lambda: len(ingress.bodies) >= 40)
        process.kill()
        process.wait(10)
        time.sleep(0.3)  # let the posts already on the wire finish on the server side
        accepted_before, journaled = len(ingress.bodies), journal_rows(state)
        assert 0 < journaled <= accepted_before
        # Only in-flight messages were unrecorded: at most 2 x jobs batches of ~50 ms of posting.
        assert accepted_before - journaled <= 2 * jobs * max(1, int(BATCH_SECONDS / 0.02))
        code, _, err = run_import(args, {})
        assert code == 0, err
    assert len(ingress.bodies) - accepted_before == total - journaled  # the rerun sent exactly the rest
    assert set(ingress.bodies) == set(messages)


def test_ctrl_c_stops_cleanly_saves_state_and_prints_the_summary(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    messages = [message(n) for n in range(300)]
    mbox = write_mbox(tmp_path / "in.mbox", messages)
    with Ingress204(delay=0.02) as ingress:
        args = ["--url", ingress.url, "--state", state, "--jobs", "2", str(mbox)]
        process = import_process(args, clean_env)
        wait_for(lambda: len(ingress.bodies) >= 20)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 75, err
        assert b"interrupted: run the same command again to resume" in out
        delivered_then = len(ingress.bodies)
        assert journal_rows(state) == delivered_then  # in-flight posts were finished and recorded
        code, out_text, _ = run_import(args, {})
    assert code == 0
    assert len(ingress.bodies) == 300 and set(ingress.bodies) == set(messages)
    assert f"{delivered_then} already delivered" in out_text


def test_plain_progress_lines_when_not_a_terminal(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    from mailbox_relay.import_summary import Summary
    from mailbox_relay.progress import PlainProgress

    class Stream:
        text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    stream = Stream()
    progress = PlainProgress(stream, interval=0)  # type: ignore[arg-type]
    done = Summary(messages=10, delivered=9, failed=1)
    progress.update(done, 500_000, 1_000_000)
    assert stream.text.startswith("import: 10 messages, 9 delivered, 1 failed; 0.5 MB of 1.0 MB;")
    assert os.linesep in stream.text


def test_adaptive_concurrency_halves_on_struggle_and_grows_back() -> None:
    from mailbox_relay.outcome import DELIVERED, Outcome, Reason
    from mailbox_relay.workers import AdaptiveConcurrency

    lines: List[str] = []
    pacer = AdaptiveConcurrency(8, lines.append)
    for _ in range(8):
        assert pacer.before() >= 0
    assert pacer.active == 8
    pacer.after(Outcome(Reason.SERVER_ERROR, "ingress failed with HTTP 500"))
    assert int(pacer.limit) == 4
    assert lines == ["4.3.0 ingress failed with HTTP 500: 4 concurrent deliveries"]
    for reason in (Reason.TIMEOUT, Reason.BUSY, Reason.SERVER_ERROR, Reason.SERVER_ERROR):
        pacer.after(Outcome(reason, "x"))
    assert pacer.limit == 1.0  # never below one
    pacer.after(Outcome(Reason.AUTH, "x"))  # not a sign of load: no change
    assert pacer.limit == 1.0
    pacer.after(DELIVERED)
    pacer.after(DELIVERED)
    assert pacer.active == 0 and int(pacer.limit) == 2
    for _ in range(100):
        pacer.before()
        pacer.after(DELIVERED)
    assert pacer.limit == 8.0  # back to --jobs, and no further


def test_mboxrd_recipients_and_max_size_through_the_command(
    tmp_path: Path, clean_env: Dict[str, str], state: str
) -> None:
    body = b">From quoted once\n>>From quoted twice"
    small = message(0, body=body)
    big = message(1, body=b"x" * 5000)
    mbox = write_mbox(tmp_path / "rd.mbox", [small, big])
    with Ingress204() as ingress:
        args = ["--url", ingress.url, "--state", state, "--mbox-format", "mboxrd", "--max-size", "4K"]
        code, report = summary([*args, "--envelope-recipient", "archive@example.com", str(mbox)], {})
    assert code == 65 and (report["delivered"], report["invalid"]) == (1, 1)
    assert "over the --max-size limit of 4096 bytes" in report["failures"][0]["reason"]  # type: ignore[index]
    (sent,) = ingress.bodies
    assert sent.startswith(b"X-Original-To: archive@example.com\n")
    assert b"\nFrom quoted once\n>From quoted twice" in sent


def test_rate_limits_messages_per_second(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(n) for n in range(10)])
    with Ingress204() as ingress:
        started = time.monotonic()
        code, _, _ = run_import(["--url", ingress.url, "--no-state", "-q", "--rate", "20", str(mbox)], {})
        elapsed = time.monotonic() - started
    assert code == 0 and len(ingress.bodies) == 10
    assert elapsed >= 9 / 20  # the tenth message may not start before 0.45 s


def test_rich_progress_logs_above_the_bar_and_ends_on_the_final_counts() -> None:
    import io

    from mailbox_relay.import_summary import Summary
    from mailbox_relay.progress import RichProgress

    stream = io.StringIO()
    progress = RichProgress(stream)
    progress.log("in.mbox: reading as mbox")
    progress.update(Summary(messages=3, delivered=3), 100, 1000)
    progress.close(Summary(messages=20, delivered=19, failed=1))
    text = stream.getvalue()
    assert text.index("mailbox-relay: in.mbox: reading as mbox") < text.index("import")
    assert "20 msgs" in text and "1 failed" in text


def test_rich_progress_after_ctrl_c_ends_on_the_bytes_really_done() -> None:
    import io

    from mailbox_relay.import_summary import Summary
    from mailbox_relay.progress import RichProgress

    stream = io.StringIO()
    progress = RichProgress(stream)
    progress.update(Summary(messages=3, delivered=3), 600_000, 1_200_000)
    progress.update(Summary(messages=3, delivered=3), 610_000, 1_200_000)  # within 0.1 s: not drawn
    progress.close(Summary(messages=6, delivered=6, interrupted=True))
    last = stream.getvalue().rstrip().splitlines()[-1]
    assert "0.6/1.2 MB" in last and "1.2/1.2" not in last, last


def test_the_rate_counts_only_messages_this_run_worked_on() -> None:
    """Already delivered (the journal) and filtered-out messages cost nothing: not in the rate."""
    import time

    from mailbox_relay.import_summary import Summary, summary_lines

    summary = Summary(messages=500, already=400, filtered=60, delivered=40, started=time.monotonic() - 10)
    first = next(iter(summary_lines(summary)))
    assert first.startswith("500 messages in 10.0s (4/s):"), first


def test_verbose_lists_every_setting_and_its_source(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    mbox = write_mbox(tmp_path / "in.mbox", [message(0)])
    with Ingress204() as ingress:
        code, _, err = run_import(
            ["-v", "--url", ingress.url, "--no-state", "--retry-for", "5", str(mbox)], {}
        )
    assert code == 0
    assert "mailbox-relay: retry_for = 5.0 (option --retry-for)" in err
    assert "password = <set> (env MAILBOX_RELAY_PASSWORD)" in err and "=pw" not in err
