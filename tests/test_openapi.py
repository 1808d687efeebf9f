"""
The OpenAPI document of the HTTP API (gridnode/web/openapi.yaml, linked as docs/openapi.yaml): a
valid OpenAPI 3.1 document, served at ``GET /openapi.yaml`` with no token, and naming exactly the
routes the web layer serves, so it cannot go stale silently. The live check against a running
node is tests/test_openapi_nodes.py.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate
from twisted.internet.task import Clock
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from gridnode.web import api, cors, http, jobs, tus
from gridnode.web.api import OPENAPI, api_root
from tests.test_access import MemoryNode

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
#: example values of the document's path parameters, to walk the resource tree with
EXAMPLES = {"id": "01M877F0V44Q28FN0X7FCX8VXD", "upload": "01M877F0V44Q28FN0X7FCX8VXD", "file": "poster.jpg",
            "signature": "~1764070800.k1." + "A" * 43}
#: resources that are no route of their own: error answers, the tree's inner nodes, CORS's wrapper
NOT_ROUTES = {http.ErrorResource, http.JSONRoot, cors._CORSRoot, cors._Preflight}


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(Path(OPENAPI).read_text())
    return loaded


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())


def concrete(path: str) -> str:
    """A path of the document with its parameters filled in."""
    return "/static/style.css" if path == "/static/{file}" else path.format(**EXAMPLES)


def leaf(root: Resource, path: str) -> Resource:
    """The resource twisted.web renders for ``path`` (as the site walks the tree)."""
    request = DummyRequest([s.encode() for s in path[1:].split("/")])
    request.path = path.encode()
    found: Resource = getChildForRequest(root, request)
    return found


def served_methods(resource: Resource, path: str) -> set[str]:
    """The methods a resource answers (HEAD only where it says so itself: twisted.web answers a HEAD
    of any GET, without the body)."""
    if isinstance(resource, tus._FilesResource):
        upload = path.rstrip("/").rsplit("/", 1)[-1]
        return {m.decode().lower() for m in tus.methods("" if upload == "files" else upload)}
    return {m for m in METHODS if callable(getattr(resource, f"render_{m.upper()}", None))}


class DocumentTests:
    def test_it_is_a_valid_openapi_31_document(self) -> None:
        """openapi-spec-validator accepts the document, and it says it is OpenAPI 3.1."""
        doc = document()
        validate(doc)
        assert doc["openapi"].startswith("3.1.")

    def test_docs_openapi_is_the_packaged_document(self) -> None:
        """docs/openapi.yaml is the document the package ships and the node serves (a link to it)."""
        assert (ROOT / "docs" / "openapi.yaml").read_bytes() == Path(OPENAPI).read_bytes()
        # (tox runs the tests on the installed package: OPENAPI is then its copy of the checkout's file)
        assert (ROOT / "docs" / "openapi.yaml").resolve() == ROOT / "gridnode" / "web" / "openapi.yaml"

    def test_it_is_package_data(self) -> None:
        """setup.py ships the document with gridnode.web, so an installed node serves it."""
        setup = (ROOT / "setup.py").read_text()
        assert re.search(r'"gridnode\.web": \[[^\]]*"openapi\.yaml"', setup)

    def test_error_codes_are_the_contracts(self) -> None:
        """The document's error codes are exactly the wire codes of docs/api.md's error table."""
        table = (ROOT / "docs" / "api.md").read_text().split("## Error codes", 1)[1].split("\n## ", 1)[0]
        documented: set[str] = set()
        for line in table.splitlines():
            cells = line.split("|")
            if len(cells) > 3 and cells[2].strip() not in ("status", "---", "(job)", "job"):
                if cells[3].strip() != "job":  # a code only a failed job's record holds
                    documented |= set(re.findall(r"`([a-z_]+)`", cells[1]))
        assert set(document()["components"]["schemas"]["ErrorCode"]["enum"]) == documented

    def test_every_operation_says_who_may_call_it(self) -> None:
        """Every operation has its own security: none for public routes, else the bearer token with
        the scope access.py's route table asks of it."""
        from gridnode.web.access import ANY, need, segments

        for path, item in document()["paths"].items():
            at = concrete(path)
            for method in METHODS:
                if method not in item:
                    continue
                security = item[method]["security"]
                needed = need(method.upper().encode(), segments(at.encode()))
                if needed.scope is None:
                    assert security == [], (method, path)
                else:
                    scopes = [] if needed.scope == ANY else [needed.scope]
                    assert security[0] == {"bearer": scopes}, (method, path)
                    assert (len(security) == 2) == needed.query_token, (method, path)


def mismatches(root: Resource, paths: dict[str, Any]) -> list[str]:
    """Where the document's ``paths`` and the resource tree under ``root`` disagree: a documented path
    that reaches no route or a route taking other methods, a child of the root no path starts with,
    a resource class of the web layer no path reaches."""
    found = []
    for path, item in paths.items():
        at = concrete(path)
        resource = leaf(root, at)
        if type(resource) in NOT_ROUTES:
            found.append(f"{path}: no such route")
            continue
        documented = {m for m in METHODS if m in item}
        served = served_methods(resource, at)
        if "head" not in documented and "get" in documented:
            served.discard("head")
        if served != documented:
            found.append(f"{path}: serves {sorted(served)}, documented {sorted(documented)}")
    tops = {p.strip("/").split("/")[0] for p in paths}
    found += [f"/{name.decode()}: not documented" for name in root.children if name.decode() not in tops]
    reached = {type(leaf(root, concrete(p))) for p in paths} | {type(root.children[b"registry"]), type(root)}
    for module in (api, jobs, tus, http, cors):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Resource) and cls.__module__ == module.__name__ and cls not in reached | NOT_ROUTES:
                found.append(f"{cls.__name__}: reached by no documented path")
    return found


class RouteTests:
    def test_the_document_and_the_routes_agree(self, node: MemoryNode) -> None:
        """Each path of the document (its parameters filled in) reaches a resource that takes exactly
        the methods the document lists there; every child of the root and every resource class of
        the web layer is reached by a path of the document."""
        assert mismatches(api_root(node.view), document()["paths"]) == []

    def test_a_stale_document_is_caught(self, node: MemoryNode) -> None:
        """The check fails for a route left out, a route that does not exist, a method left out and a
        method the route does not take."""
        root = api_root(node.view)
        paths = document()["paths"]
        left_out = {p: item for p, item in paths.items() if p != "/peers"}
        assert mismatches(root, left_out) == ["/peers: not documented", "PeersResource: reached by no documented path"]
        assert mismatches(root, {**paths, "/jobs/{id}/log": {"get": {}}}) == ["/jobs/{id}/log: no such route"]
        no_delete = {**paths, "/jobs/{id}": {"get": {}}}
        assert mismatches(root, no_delete) == ["/jobs/{id}: serves ['delete', 'get'], documented ['get']"]
        put = {**paths, "/health": {"get": {}, "put": {}}}
        assert mismatches(root, put) == ["/health: serves ['get'], documented ['get', 'put']"]


class ServedTests:
    def test_get_openapi_yaml(self, node: MemoryNode) -> None:
        """``GET /openapi.yaml`` needs no token (on a node with a keyring) and answers the document as
        YAML."""
        r = node.request("GET", "/openapi.yaml")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/yaml"
        assert r.content == Path(OPENAPI).read_bytes()
        assert yaml.safe_load(r.content)["paths"]["/openapi.yaml"]["get"]["security"] == []
