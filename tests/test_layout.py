"""The package's shape: no import cycles, and deliver's path stays apart from the other commands."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "mailbox_relay"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: Set[str]) -> Set[str]:
    """Every package module this file imports, at the top or inside a function (lazily)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a path that ends where it starts, or [] if there is none."""
    state: Dict[str, str] = {}

    def visit(node: str, trail: List[str]) -> List[str]:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target] if target in trail else [node, target]
            if target not in state:
                cycle = visit(target, [*trail, target])
                if cycle:
                    return cycle
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules() -> None:
    graph = import_graph()
    assert "mailbox_relay.cli.deliver" in graph and "mailbox_relay.ingress.client" in graph
    assert find_cycle(graph) == []


def test_deliver_imports_none_of_the_other_commands() -> None:
    graph = import_graph()
    reached: Set[str] = set()
    todo = ["mailbox_relay.cli.deliver"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    others = {"mailbox_relay.cli.import_", "mailbox_relay.cli.check", "mailbox_relay.cli.serve"}
    others |= {
        "mailbox_relay.cli.fetch",
        "mailbox_relay.fetch.once",
        "mailbox_relay.sources.imap",
        "mailbox_relay.fetch.watch",
        "mailbox_relay.cli.auth",
        "mailbox_relay.sources.oauth2",
        # operating watch (issue 21): health, metrics, the endpoint, systemd, JSON logs
        "mailbox_relay.fetch.health",
        "mailbox_relay.fetch.metrics",
        "mailbox_relay.fetch.listen",
        "mailbox_relay.fetch.operate",
        "mailbox_relay.notify",
        "mailbox_relay.logformat",
    }
    assert (
        reached & (others | {"mailbox_relay.importer", "mailbox_relay.check", "mailbox_relay.server"})
        == set()
    )


def test_imports_run_one_way_settings_below_ingress_and_ingress_below_cli() -> None:
    graph = import_graph()
    ingress = {name for name in graph if name.startswith("mailbox_relay.ingress")}
    cli = {name for name in graph if name.startswith("mailbox_relay.cli")}
    assert "mailbox_relay.ingress.target" in ingress and "mailbox_relay.ingress.endpoint" in ingress
    assert graph["mailbox_relay.settings"] & ingress == set()
    for module in ingress:
        assert graph[module] & cli == set(), module
    # outcome is the bottom: the exit codes and kinds every layer reads, importing nothing of ours
    assert graph["mailbox_relay.outcome"] == set()


def test_prometheus_client_is_imported_by_metrics_alone() -> None:
    """Only watch loads it (through operate.py, lazily): a third-party import anywhere else would
    put it on another command's path."""
    importers = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(
            (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"))
            or (
                isinstance(node, ast.Import)
                and any(a.name.startswith("prometheus_client") for a in node.names)
            )
            for node in ast.walk(ast.parse(path.read_text()))
        )
    }
    assert importers == {"mailbox_relay.fetch.metrics"}


def calls_in(path: Path) -> Set[str]:
    """Dotted names this file calls (`requests.post`, `sqlite3.connect`...)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            if isinstance(value, ast.Name):
                found.add(f"{value.id}.{node.func.attr}")
    return found


def callers_of(*names: str) -> Set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py") if calls_in(path) & set(names)}


def test_every_http_request_goes_through_the_one_session_factory() -> None:
    bare = ("requests.Session", "requests.post", "requests.get", "requests.request", "requests.put")
    assert callers_of(*bare) == {"mailbox_relay.sessions"}


def test_sqlite_is_opened_in_one_module() -> None:
    assert callers_of("sqlite3.connect") == {"mailbox_relay.state.store"}


def test_the_helpers_above_see_what_they_look_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import requests\nrequests.post('u')\nimport sqlite3\nsqlite3.connect('x')\n")
    assert calls_in(sample) == {"requests.post", "sqlite3.connect"}
