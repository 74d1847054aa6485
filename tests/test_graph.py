"""The Graph source and app-only sign-in against the local Graph (tests/graph_server.py): a real
HTTP server on loopback that behaves as the reference says Exchange Online does."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from .graph_server import SECRET_ID, LocalGraph
from .helpers import invoke
from .peers import Ingress204

BOX = "support@contoso.example"


def mail(n: int, tag: str = "graph") -> bytes:
    return (
        f"From: sender{n}@example.com\r\nTo: {BOX}\r\nSubject: {tag} {n}\r\n"
        f"Message-ID: <{tag}-{n}@example.com>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
        f"Body of {tag} message {n}.\r\n"
    ).encode()


def toml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


class World:
    def __init__(self, tmp: Path, graph: LocalGraph, ingress: Ingress204) -> None:
        self.tmp, self.graph, self.ingress = tmp, graph, ingress
        self.keys: Dict[str, Any] = {"start": "all"}
        self.certificate = False

    def config(self) -> str:
        table = self.graph.account(BOX, self.tmp, certificate=self.certificate, **self.keys)
        lines = [
            f"url = {toml(self.ingress.url)}",
            'password = "pw"',
            f"fetch_state = {toml(str(self.tmp / 'state.sqlite3'))}",
            "retry_for = 0",
            "",
            "[accounts.box]",
            *(f"{key} = {toml(value)}" for key, value in table.items()),
        ]
        path = self.tmp / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    def run(self, *args: str) -> Tuple[int, str, str]:
        return invoke([*args, "--config", self.config()], env={"XDG_STATE_HOME": str(self.tmp / "xdg")})

    def fetch(self, *args: str) -> Tuple[int, str, str]:
        return self.run("fetch", *args)

    def delivered_ids(self) -> List[str]:
        """The Message-IDs the ingress stored, in order (the bodies differ by render)."""
        found = []
        for body in self.ingress.bodies:
            for line in body.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    found.append(line.split(b":", 1)[1].strip().decode())
        return found

    def spooled(self) -> List[Path]:
        spool = self.tmp / "spool"
        return sorted(spool.iterdir()) if spool.exists() else []


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with LocalGraph() as graph, Ingress204() as ingress:
        graph.mailbox(BOX, "Support", "Done")
        yield World(tmp_path, graph, ingress)


def test_paging_delivers_every_message_once_and_stores_the_delta_link(world: World) -> None:
    for n in range(250):  # three pages of 100 (Prefer: odata.maxpagesize)
        world.graph.deliver(BOX, mail(n))
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert sorted(world.delivered_ids()) == sorted(f"<graph-{n}@example.com>" for n in range(250))
    pages = [path for method, path, _ in world.graph.requests if "/delta" in path]
    assert len(pages) == 3 and "skiptoken" in pages[1]
    assert not world.graph.without_immutable  # every message request asked for immutable ids
    db = sqlite3.connect(str(world.tmp / "state.sqlite3"))
    (cursor,) = db.execute("SELECT cursor FROM folders").fetchone()
    assert "deltatoken" in json.loads(cursor)["delta"]
    # The next run follows the delta link: only what arrived since.
    world.graph.deliver(BOX, mail(1000))
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.delivered_ids()[250:] == ["<graph-1000@example.com>"]


def test_start_new_leaves_what_is_there_and_delivers_what_comes(world: World) -> None:
    for n in range(3):
        world.graph.deliver(BOX, mail(n))
    world.keys["start"] = "new"
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.ingress.bodies == []
    assert "3 existing messages left alone" in err + out
    world.graph.mark_read(world.graph.in_folder(BOX, "inbox")[0])  # an update: not new mail
    world.graph.deliver(BOX, mail(9))
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.delivered_ids() == ["<graph-9@example.com>"]


def test_a_retry_posts_the_first_download_though_graph_regenerates_the_mime(world: World) -> None:
    message = world.graph.deliver(BOX, mail(1))
    world.ingress.status = 500  # Rails fails: the message is tried again later
    code, out, err = world.fetch()
    assert code != 0
    assert message.downloads == 1
    (spooled,) = world.spooled()
    first = spooled.read_bytes()
    assert world.graph.render(message) != first  # Graph would answer other bytes now
    world.ingress.status = 204
    db = sqlite3.connect(str(world.tmp / "state.sqlite3"))
    db.execute("UPDATE messages SET next_try=0")
    db.commit()
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.ingress.bodies[-1].endswith(first.split(b"\r\n\r\n", 1)[1])
    assert first in world.ingress.bodies[-1] or world.ingress.bodies[-1].endswith(first)
    assert message.downloads == 2  # the test's own render only: the retry downloaded nothing


def test_410_resync_delivers_nothing_twice(world: World) -> None:
    for n in range(5):
        world.graph.deliver(BOX, mail(n))
    assert world.fetch()[0] == 0
    world.graph.expire_sync_states()
    world.graph.deliver(BOX, mail(5))
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert sorted(world.delivered_ids()) == sorted(f"<graph-{n}@example.com>" for n in range(6))


def test_resync_keeps_leaving_alone_what_start_new_left_alone(world: World) -> None:
    for n in range(4):
        world.graph.deliver(BOX, mail(n), received=1_600_000_000)
    world.keys["start"] = "new"
    assert world.fetch()[0] == 0
    world.graph.expire_sync_states()
    world.graph.deliver(BOX, mail(7))
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.delivered_ids() == ["<graph-7@example.com>"]


def test_removed_in_a_later_page_is_not_fetched(world: World) -> None:
    messages = [world.graph.deliver(BOX, mail(n)) for n in range(150)]
    world.keys["start"] = "new"
    assert world.fetch()[0] == 0
    for n in range(150, 160):
        world.graph.deliver(BOX, mail(n))
    # Between two rounds: the delta brings these as created; one is deleted since (its
    # @removed comes in the same round, after it).
    late = world.graph.in_folder(BOX, "inbox")[-1]
    with world.graph.lock:
        world.graph._log(world.graph._folder_of(late), "created", late.immutable)
        late.deleted = True
        world.graph._log(world.graph._folder_of(late), "removed", late.immutable)
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert sorted(world.delivered_ids()) == sorted(f"<graph-{n}@example.com>" for n in range(150, 159))
    assert not any(late.immutable.replace("=", "%3D") in path for _, path, _ in world.graph.requests)
    assert messages


def test_after_move_keeps_the_key_although_the_regular_id_changes(world: World) -> None:
    world.keys["after"] = "move:Done"
    message = world.graph.deliver(BOX, mail(1))
    regular = message.regular
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert message.regular != regular  # Graph gave it a new (regular) id
    assert world.graph.in_folder(BOX, "Done") == [message]
    # A resync of the inbox, and the Done folder watched too: still delivered once.
    world.graph.expire_sync_states()
    assert world.fetch()[0] == 0
    assert world.delivered_ids() == ["<graph-1@example.com>"]
    assert world.spooled() == []  # acknowledged: its spool file is gone


def test_after_delete_twice_counts_the_404_as_done(world: World, tmp_path: Path) -> None:
    world.keys["after"] = "delete"
    world.graph.deliver(BOX, mail(1))
    assert world.fetch()[0] == 0
    assert world.graph.in_folder(BOX, "inbox") == []


def test_429_retry_after_is_honoured(world: World) -> None:
    for n in range(3):
        world.graph.deliver(BOX, mail(n))
    world.graph.script(429, 0.2, count=3)
    world.graph.script(503, 0.1)
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert len(world.delivered_ids()) == 3
    assert world.graph.throttled == 4


def test_at_most_four_requests_in_flight_per_mailbox(world: World) -> None:
    world.graph.delay = 0.05
    for n in range(40):
        world.graph.deliver(BOX, mail(n))
    world.keys["after"] = "seen"
    code, out, err = world.fetch()
    assert code == 0, out + err
    assert world.graph.max_in_flight == 4  # used, never passed
    assert world.graph.throttled == 0


def test_a_restricted_app_is_one_line_naming_the_access_policy(world: World) -> None:
    world.graph.restricted.add(BOX)
    code, out, err = world.fetch()
    assert code != 0
    assert "application access policy" in err and "Access to OData is disabled" in err
    code, out, err = world.run("check", "--account", "box")
    assert code == 77, out + err
    assert "application access policy" in out + err


def test_a_wrong_secret_names_aadsts7000215_and_what_it_means(world: World) -> None:
    world.config()
    (world.tmp / "secret").write_text(SECRET_ID + "\n")
    world.keys["oauth2_client_secret_file"] = str(world.tmp / "wrong")
    (world.tmp / "wrong").write_text(SECRET_ID + "\n")
    (world.tmp / "wrong").chmod(0o600)
    code, out, err = world.run("check", "--account", "box")
    assert code == 78, out + err
    assert "AADSTS7000215" in out + err and "not its Secret ID" in out + err
    code, out, err = world.fetch()
    assert code == 75 and "AADSTS7000215" in err
    assert world.graph.requests == []  # no Graph request without a token


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_a_certificate_assertion_the_server_verifies(world: World, alg: str) -> None:
    world.certificate = True
    world.keys["oauth2_certificate_alg"] = alg
    world.graph.deliver(BOX, mail(1))
    code, out, err = world.fetch()
    assert code == 0, out + err
    (request,) = world.graph.token_requests
    assert "client_secret" not in request and request["client_assertion"].count(".") == 2


def test_a_certificate_not_registered_is_refused_with_aadsts700027(world: World, tmp_path: Path) -> None:
    from .app_credentials import Certificate

    world.certificate = True
    world.config()
    other = Certificate()
    world.keys["oauth2_certificate_file"] = other.write(tmp_path / "other.pem")
    code, out, err = world.run("check", "--account", "box")
    assert code == 78, out + err
    assert "AADSTS700027" in out + err


def test_check_shows_the_token_the_folders_and_the_permissions(world: World) -> None:
    world.keys["after"] = "move:Done"
    world.keys["folders"] = ["inbox", "Support"]
    _, out, err = world.run("check", "--account", "box")
    # (the ingress here is no Action Mailbox: only the account's steps are looked at)
    for step in (
        "oauth2 token",
        "permissions: application permissions Mail.ReadWrite",
        "mailbox",
        "folder Support",
    ):
        assert f"✓ {step}" in out, out + err
    assert "✓ after: move:Done: the folder exists" in out


def test_check_says_mail_read_cannot_acknowledge(world: World) -> None:
    world.graph.roles = {"Mail.Read"}
    world.keys["after"] = "seen"
    code, out, err = world.run("check", "--account", "box")
    assert code == 77, out + err
    assert "Mail.ReadWrite" in out and 'after = "keep"' in out


# --- the account keys ------------------------------------------------------------------------


def parse(**table: Any) -> Any:
    from mailbox_relay.accounts import parse_account

    return parse_account(
        "box",
        {key: value for key, value in {"username": BOX, **table}.items() if value is not None},
        "c.toml",
    )


def parse_refused(**table: Any) -> str:
    from mailbox_relay.outcome import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse(**table)
    return caught.value.outcome.detail


APP = {
    "auth": "client_credentials",
    "oauth2_client_id": "app",
    "oauth2_tenant": "contoso.onmicrosoft.com",
    "oauth2_client_secret_file": "/s",
}


def test_a_graph_account_has_graph_defaults() -> None:
    box = parse(source="graph", **APP)
    assert (box.host, box.port, box.tls) == ("graph.microsoft.com", 443, "implicit")
    assert box.folders == ("inbox",) and box.poll_interval == 15
    assert box.oauth2.provider.scopes == ("https://graph.microsoft.com/.default",)
    assert box.oauth2.provider.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    imap = parse(provider="microsoft", **APP)
    assert imap.oauth2.provider.scopes == ("https://outlook.office365.com/.default",)
    assert imap.poll_interval == 60


def test_app_only_settings_that_cannot_work_are_refused() -> None:
    assert "signs in with OAuth2" in parse_refused(source="graph", password="pw")
    assert "graph_url" in parse_refused(source="graph", host="h", **APP)
    assert "needs oauth2_tenant" in parse_refused(provider="microsoft", **{**APP, "oauth2_tenant": None})
    both = {**APP, "oauth2_certificate_file": "/c"}
    assert "only one of them" in parse_refused(provider="microsoft", **both)
    assert "signs in as an app" in parse_refused(provider="microsoft", password="pw", **APP)
    assert "http:// only to a loopback host" in parse_refused(
        source="graph", graph_url="http://graph.example/v1.0", **APP
    )
    assert "needs oauth2_service_account_file" in parse_refused(
        provider="google", auth="google_service_account"
    )
