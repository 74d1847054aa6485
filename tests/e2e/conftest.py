"""Fixtures for the end-to-end suite: one Dovecot and one Rails app per run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from ..oauth_provider import OAuthProvider
from .world import (
    Dovecot,
    Postgres,
    PostgresRailsApp,
    RailsApp,
    build_app_template,
    build_postgres_template,
    mail_host_install,
    need,
    relay_command,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    need("dovecot")
    server = Dovecot(Path("/tmp") / f"mailbox-relay-e2e-dovecot-{os.getpid()}")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def oauth_provider() -> Iterator[OAuthProvider]:
    with OAuthProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def oauth_dovecot(oauth_provider: OAuthProvider) -> Iterator[Dovecot]:
    """A second Dovecot whose XOAUTH2 logins are checked at the test OAuth2 provider."""
    need("dovecot")
    server = Dovecot(
        Path("/tmp") / f"mailbox-relay-e2e-oauth-{os.getpid()}", f"{oauth_provider.url}/introspect"
    )
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def idp(oauth_provider: OAuthProvider) -> OAuthProvider:
    """The session's provider, with this test's defaults: hour-long tokens, no rotation."""
    oauth_provider.lifetime, oauth_provider.rotate, oauth_provider.client_secret = 3600, False, None
    oauth_provider.decline = False
    oauth_provider.grants_used.clear()
    return oauth_provider


@pytest.fixture(scope="session")
def rails_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RailsApp]:
    need("rails", "ruby", "bundle")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mailbox-relay-e2e"
    cache.mkdir(parents=True, exist_ok=True)
    template = build_app_template(cache)
    root = tmp_path_factory.mktemp("rails") / "app"
    shutil.copytree(template, root, symlinks=True)
    app = RailsApp(root)
    app.url = app.serve()
    yield app
    app.stop()


@pytest.fixture
def watches() -> Iterator[List[Any]]:
    """`watch` processes a test started (anything with kill()): none outlives its test."""
    started: List[Any] = []
    yield started
    for watch in started:
        watch.kill()


@pytest.fixture
def rails(rails_app: RailsApp) -> RailsApp:
    rails_app.reset()
    return rails_app


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    need("psql")
    cluster = Postgres(Path("/tmp") / f"mailbox-relay-e2e-pg-{os.getpid()}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def rails_pg_app(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[PostgresRailsApp]:
    """The production-shaped app (PostgreSQL, puma 2 x 5 threads, :async jobs), once per run."""
    need("rails", "ruby", "bundle")
    ruby_pg = subprocess.run(["ruby", "-e", "require 'pg'"], capture_output=True)
    if ruby_pg.returncode != 0:
        pytest.skip("needs ruby-pg (Debian: apt-get install ruby-pg)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mailbox-relay-e2e"
    cache.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("rails-pg") / "app"
    shutil.copytree(build_postgres_template(cache), root, symlinks=True)
    app = PostgresRailsApp(root, postgres)
    app.prepare()
    app.url = app.serve()
    yield app
    app.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def rails_any(request: pytest.FixtureRequest) -> RailsApp:
    """Each of the two app shapes in turn: the development app on SQLite (inline routing) and the
    production-shaped one on PostgreSQL. Modules opt in with `rails = rails_any`."""
    app: RailsApp = request.getfixturevalue("rails_app" if request.param == "sqlite" else "rails_pg_app")
    app.reset()
    return app


@pytest.fixture
def relay_env(rails: RailsApp) -> Dict[str, str]:
    """The environment a mail program passes on to mailbox-relay, pointing at the Rails app."""
    return {
        **os.environ,
        "MAILBOX_RELAY_URL": rails.url,
        "MAILBOX_RELAY_PASSWORD": rails.password,
        "MAILBOX_RELAY_RETRY_FOR": "2",
    }


@pytest.fixture(scope="session")
def relay() -> str:
    return relay_command()


@pytest.fixture(scope="session")
def unconfigured_url(rails_app: RailsApp) -> str:
    """A second server of the same app, started without the relay ingress (it answers 404)."""
    return rails_app.serve(ingress="none")


@pytest.fixture(scope="session")
def mail_host() -> Iterator[Path]:
    """mailbox-relay installed as the README tells a mail host (a venv every user can run),
    in a directory every user can reach (not under /root): the path of its script."""
    root = Path("/tmp") / f"mailbox-relay-e2e-install-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    yield mail_host_install(root)
    shutil.rmtree(root, ignore_errors=True)
