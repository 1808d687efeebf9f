"""
The shape of the package, checked: which layer may import which.

The core (jobs, store, registry, membership, media) never imports the web
layer; the web layer sees the core; only the assembly (``gridnode/node.py``)
wires the two. The membership knows nothing of the store, and the client
library (``gridnode/client/``) imports no server code.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gridnode"
#: modules that wire the layers together
ASSEMBLY = {"gridnode.node"}
#: what the client library may import of the package besides itself (tokens and keyring: `gridnode
#: token` mints with the standard library and PyJWT only)
CLIENT_MAY_IMPORT = {"gridnode", "gridnode.errors", "gridnode.keys", "gridnode.registry", "gridnode.registry.records",
                     "gridnode.tokens", "gridnode.keyring", "gridnode.priority"}
#: the one module allowed over the size limit: the SWIM machine, one protocol in one place
MAX_LINES = 500
LONG_MODULES = {"gridnode.membership.swim"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every gridnode module ``path`` imports, at any depth of its code (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def test_the_graph_is_read() -> None:
    g = graph()
    assert "gridnode.web.api" in g["gridnode.node"] or any(m.startswith("gridnode.web") for m in g["gridnode.node"])
    assert "gridnode.errors" in g["gridnode.jobs"]


def test_no_import_cycle() -> None:
    g = graph()
    # Package __init__ modules are left out of cycles they only re-export.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(g[name]):
            if g.get(nxt) is None:
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_the_web_layer_and_the_assembly_import_the_web_layer() -> None:
    offenders = {name: sorted(m for m in deps if m.startswith("gridnode.web"))
                 for name, deps in graph().items()
                 if not name.startswith("gridnode.web") and name not in ASSEMBLY}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_membership_knows_no_store() -> None:
    offenders = {name: sorted(m for m in deps if m.startswith(("gridnode.store", "gridnode.keys",
                                                                "gridnode.registry")))
                 for name, deps in graph().items() if name.startswith("gridnode.membership")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_client_imports_no_server_code() -> None:
    offenders = {name: sorted(m for m in deps if not m.startswith("gridnode.client") and m not in CLIENT_MAY_IMPORT
                              and not m.startswith("gridnode.store"))
                 for name, deps in graph().items() if name.startswith("gridnode.client")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_is_too_long() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES} == {}


def test_nothing_points_outside_the_repository() -> None:
    """A clone is all a reader has: no file may send them to a path beside it."""
    root = PACKAGE.parent
    suffixes = {".py", ".md", ".toml", ".ini", ".cfg", ".txt", ".js", ".html", ""}
    # The patterns are built, not written out, so that this file does not itself name the paths.
    beside = "shared"
    outside = (f"../{beside}", f"{beside}/DESIGN", "DESIGN" + ".md", f"{beside}/STYLE", "STYLE" + ".md", "/" + "seed/")
    found = []
    for top in ("README.md", "bench", "docs", "gridnode", "scripts", "tests", "twisted", "pyproject.toml", "tox.ini"):
        for path in sorted([root / top] if (root / top).is_file() else (root / top).rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or path.suffix not in suffixes or "__pycache__" in rel.parts:
                continue
            text = path.read_text(errors="replace")
            found += [f"{rel}: {word}" for word in outside if word in text]
    assert found == []


def test_what_the_client_mints_with_is_light() -> None:
    """`gridnode token` imports gridnode.tokens and gridnode.keyring: the standard library and PyJWT
    only (no Twisted, boto3 or server code), so the client stays a small install."""
    mods = modules()
    allowed = {"__future__", "collections", "dataclasses", "os", "re", "time", "typing", "jwt", "gridnode"}
    for name in ("gridnode.tokens", "gridnode.keyring"):
        tops: set[str] = set()
        for node in ast.walk(ast.parse(mods[name].read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
        assert tops <= allowed, (name, sorted(tops - allowed))
        assert graph()[name] <= {"gridnode.errors", "gridnode.keyring", "gridnode.priority"}, (name, graph()[name])
    assert graph()["gridnode.priority"] <= {"gridnode.errors"}
