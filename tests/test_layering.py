"""The house's layering: no import cycles, and the bottom modules import nothing above.

Read from the source with ast (imports under TYPE_CHECKING count too), so a cycle that
only bites at run time in one import order is caught here in every order.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.support import ROOT

PACKAGE = ROOT / "relay"


def _relay_imports(path) -> set[str]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "relay":
                found |= {a.name for a in node.names if a.name in modules}
            elif node.module.startswith("relay."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("relay.")}
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: _relay_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_no_import_cycles() -> None:
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {exc.args[1]}") from None
    assert "process" in order and "launcher" in order


def test_the_bottom_imports_nothing_of_relay() -> None:
    g = graph()
    for module in ("health", "errors", "redis_shared", "circuit", "explain", "rules", "logs",
                   "lanes"):
        assert g[module] == set(), f"relay/{module}.py imports {g[module]}"


def test_only_the_top_knows_the_worker() -> None:
    users = {m for m, deps in graph().items() if "process" in deps}
    assert users == {"launcher"}
    assert graph()["cli"] <= {"admin", "apps", "config", "launcher", "logs"}  # settings only



def test_relays_own_errors_share_one_root() -> None:
    from relay.config import ConfigError
    from relay.errors import RelayError
    from relay.message import InvalidMessage
    from relay.queue import WorkerReaped

    for error in (ConfigError, InvalidMessage, WorkerReaped):
        assert issubclass(error, RelayError)
    assert issubclass(InvalidMessage, ValueError)  # callers that caught ValueError still do


def test_errors_module_stays_readable_by_python_2() -> None:
    """relay.rules and relay.producer must import on 2.7, so their base may not use 3-only
    syntax: no imports, annotations, f-strings or walrus."""
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    for node in ast.walk(tree):
        assert not isinstance(node, (ast.Import, ast.ImportFrom, ast.JoinedStr, ast.AnnAssign,
                                     ast.NamedExpr)), ast.dump(node)
        if isinstance(node, ast.FunctionDef):
            assert node.returns is None and all(a.annotation is None for a in node.args.args)
