"""The explorer's web app: the page, its assets from the package, and a JSON API over a graph folder.

Routes: ``/`` (graph list) and ``/graph/<name>`` (graph view) return the page, ``/compare/<a>/<b>`` the page
that shows two graphs side by side; ``/static/<asset>`` serves the package's own files only (a fixed list read
at start-up, never a path from the request). The API:

- ``GET /api/config``; ``GET /api/graphs``; ``GET /api/graphs/<name>`` (the document, revision in ``ETag``);
  ``PUT /api/graphs/<name>/state``; ``POST /api/graphs/<name>/rename``; ``DELETE /api/graphs/<name>``;
  ``POST /api/graphs/<name>/scores`` (exact subgraph scores from the full graph); ``GET
  /api/graphs/<name>/links`` (every kept link of the document, those it leaves out for size included);
- ``GET /api/compare/<a>/<b>``: graphs ``a`` and ``b`` compared (``graphs.compare``): the features and
  supernodes they share, those only one of them has, and their influence in each; both need their full graph;
- with an engine (a model and transcoders): ``POST /api/jobs``, ``GET /api/jobs``, ``GET /api/jobs/<id>``,
  ``DELETE /api/jobs/<id>`` (cancel), and ``POST /api/graphs/<name>/intervene`` (edit the graph's feature
  nodes and compare the next tokens and greedy continuations, ``server.interventions``). Graphs carry their
  features' logit lens, computed with them;
- attention (``server.heads``; the graph needs its full graph): ``GET /api/graphs/<name>/heads`` (the head
  loadings stored with the graph, ``{n_layers, n_heads, computable, edges}``, each edge ``{source, target,
  weight, remainder, heads}`` with ``heads`` a list of ``[layer, head, loading]``, largest first);
  ``POST /api/graphs/<name>/heads`` (``{source, target}``: one cross-position edge's loadings, stored or,
  with an engine, computed; ``stored`` says which); with an engine, ``POST /api/graphs/<name>/qk``
  (``{layer, head, query, key, top?}``: the head's attention pattern on the prompt, its score at (query,
  key), the ``top`` strongest query/key node pairs and nodes, and their features' labels from the feature
  database);
- with a feature database: ``GET /api/features/<layer>/<feature>`` (the feature's dashboard),
  ``GET /api/features/search?q=<text>`` (features by label or token; ``12/3071`` names one directly) and
  ``PUT /api/features/<layer>/<feature>/label`` (a manual label, ``{"text": ..., "author": ...}``; empty text
  clears it). Graph documents are then served, and computed, with the current label of every feature node
  that has none of its own (``label_source`` says where it came from);
- ``GET /api/personas``: the persona vectors the server was started with (``--persona``, which needs an
  engine), a list of ``{name, trait, n_layers, layer}`` (``layer``: the default layer, the best of the sweep
  recorded in the file, else the middle one); empty without any. With vectors (``server.personas``):
  ``POST /api/personas/<name>/project`` (``{prompt, response?, layer?}``: the prompt as a user turn, projected
  on the vector's unit direction at the layer: ``{tokens, values, last_prompt, mean}``, the response's tokens
  and their projections, the projection at the prompt's last token and the response's mean; without a
  response only ``last_prompt``, the lists empty and ``mean`` null); ``POST /api/personas/<name>/steer``
  (``{prompt, layer?, coefficient, relative?, max_new_tokens?}``, ``relative`` true and 20 new tokens by
  default, at most 200: ``{unsteered, steered}``, the greedy continuations without and with steering at every
  position); ``GET /api/graphs/<graph>/persona/<name>?layer=L`` (``{layer, values}``: each feature node of
  a layer below ``L`` by id, its activation times its write into the residual entering ``L``, projected on
  the unit direction; the graph must come from the engine's transcoder set).

Errors are ``{"detail": "<one line>"}`` with a 4xx (or 500) status. Safety: requests must name one of the
allowed hosts (``Host`` header: the local names by default; this stops DNS-rebinding pages); a request that
changes anything must be JSON and, if it has an ``Origin``, come from the same origin (host and port);
bodies are capped; no CORS headers are ever sent, so other sites' pages cannot read answers.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from circuitmap import __version__
from circuitmap.errors import CircuitmapError, StoreError
from circuitmap.features.graph_labels import add_feature_labels, unlabelled_features
from circuitmap.features.schema import check_transcoders
from circuitmap.features.store import FeatureStore, current_label
from circuitmap.graphs.compare import LoadedGraph, compare_loaded
from circuitmap.graphs.folder import DOCUMENT_FILE
from circuitmap.persona import PersonaVector
from circuitmap.server.heads import edge_heads, head_qk, stored_heads
from circuitmap.server.interventions import run_on_graph
from circuitmap.server.jobs import Engine, Jobs
from circuitmap.server.personas import Personas
from circuitmap.server.store import GraphStore
from circuitmap.validation import check_text

MAX_BODY = 2 * 2**20
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
PAGE = "index.html"
COMPARE_PAGE = "compare.html"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_INDEX = re.compile(r"[0-9]{1,9}")
MAX_SEARCH = 200
MAX_SEARCH_HITS = 100
MAX_AUTHOR = 100


def package_assets() -> dict[str, bytes]:
    """The explorer's files shipped in the package, by name."""
    folder = resources.files("circuitmap.server").joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and Path(entry.name).suffix in ASSET_TYPES
    }


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, explicit: bool) -> None:
    """Refuse an address other machines can reach unless the user asked for it with ``--host``."""
    if not is_loopback(host) and not explicit:
        raise CircuitmapError(
            f"refusing to serve on {host}, which other machines can reach: pass --host {host} explicitly"
        )


def create_app(
    graphs: str | Path | GraphStore,
    engine: Engine | None = None,
    *,
    features: FeatureStore | None = None,
    personas: Mapping[str, PersonaVector] | None = None,
    allowed_hosts: frozenset[str] | None = LOCAL_HOSTS,
    max_body: int = MAX_BODY,
) -> Guard:
    """The explorer app over a graph folder; with ``engine``, it can also compute new graphs; with
    ``features`` (the database of the engine's transcoder set, when there is an engine), it shows feature
    dashboards and labels. The caller keeps ownership of ``features`` (the app does not close it).
    ``personas``: persona vectors of the engine's model by name (they need the engine), to project on and
    steer with.

    ``allowed_hosts``: the names requests may address (``Host`` header, port ignored); None allows any,
    for a server bound to a network address on purpose.
    """
    store = graphs if isinstance(graphs, GraphStore) else GraphStore(graphs)
    if features is not None and engine is not None:
        check_transcoders(features.meta, engine.transcoders, features.path)
    if personas and engine is None:
        raise CircuitmapError("persona vectors need an engine (a model and its transcoders) to run on")
    persona_set = Personas(personas, engine) if personas else None
    jobs = Jobs(engine, store, features) if engine is not None else None
    assets = package_assets()
    for name in (PAGE, COMPARE_PAGE):
        if name not in assets:
            raise CircuitmapError(
                f"the package has no explorer page ({name}): the installation is incomplete"
            )

    def page(request: Request) -> Response:
        return _asset_response(assets, PAGE)

    def asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name not in assets:
            raise StoreError(f"no asset {name!r}", 404)
        return _asset_response(assets, name)

    def config(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "read_only": False,
                "can_compute": engine is not None,
                "model": engine.model_spec if engine else None,
                "transcoders": engine.transcoders_spec if engine else None,
                "features": _features_summary(features),
                "version": __version__,
            }
        )

    async def list_graphs(request: Request) -> JSONResponse:
        summaries = await run_in_threadpool(store.summaries)
        return JSONResponse({"graphs": [summary.as_json() for summary in summaries]})

    async def get_graph(request: Request) -> Response:
        data, revision = await run_in_threadpool(store.read, request.path_params["name"])
        if features is not None:
            data = await run_in_threadpool(labelled_document, data, features)
        return Response(
            data,
            media_type="application/json",
            headers={"ETag": f'"{revision}"', "Cache-Control": "no-store"},
        )

    async def save_state(request: Request) -> JSONResponse:
        state = await _json_object(request)
        revision = await run_in_threadpool(store.save_state, request.path_params["name"], state)
        return JSONResponse({"revision": revision})

    async def rename(request: Request) -> JSONResponse:
        body = await _json_object(request, {"name"})
        name = await run_in_threadpool(store.rename, request.path_params["name"], body.get("name"))
        return JSONResponse({"name": name})

    async def delete(request: Request) -> Response:
        await run_in_threadpool(store.delete, request.path_params["name"])
        return Response(status_code=204)

    async def links(request: Request) -> JSONResponse:
        return JSONResponse({"links": await run_in_threadpool(store.links, request.path_params["name"])})

    async def scores(request: Request) -> JSONResponse:
        body = await _json_object(request, {"pinnedIds", "supernodes"})
        result = await run_in_threadpool(
            store.scores, request.path_params["name"], body.get("pinnedIds", []), body.get("supernodes", [])
        )
        return JSONResponse({**result.as_json(), "exact": True})

    def compare_page(request: Request) -> Response:
        return _asset_response(assets, COMPARE_PAGE)

    async def compare(request: Request) -> JSONResponse:
        first = await run_in_threadpool(loaded_graph, store, request.path_params["a"], features)
        second = await run_in_threadpool(loaded_graph, store, request.path_params["b"], features)
        comparison = await run_in_threadpool(compare_loaded, first, second)
        return JSONResponse(comparison.as_json(), headers={"Cache-Control": "no-store"})

    def needs_engine() -> Jobs:
        if jobs is None:
            raise StoreError("this server was started without --model and --transcoders", 404)
        return jobs

    async def submit(request: Request) -> JSONResponse:
        body = await _json_object(request, {"prompt", "name"})
        job = needs_engine().submit(body.get("prompt"), body.get("name"))
        return JSONResponse({"id": job.id}, status_code=202)

    def list_jobs(request: Request) -> JSONResponse:
        return JSONResponse({"jobs": [job.as_json() for job in needs_engine().all()]})

    def get_job(request: Request) -> JSONResponse:
        return JSONResponse(needs_engine().get(request.path_params["job_id"]).as_json())

    def cancel_job(request: Request) -> JSONResponse:
        return JSONResponse(needs_engine().cancel(request.path_params["job_id"]).as_json())

    async def intervene(request: Request) -> JSONResponse:
        engine = needs_engine().engine
        body = await _json_object(request)
        result = await run_in_threadpool(run_on_graph, store, request.path_params["name"], engine, body)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    async def list_heads(request: Request) -> JSONResponse:
        result = await run_in_threadpool(stored_heads, store, request.path_params["name"], engine)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    async def split_edge(request: Request) -> JSONResponse:
        body = await _json_object(request, {"source", "target"})
        result = await run_in_threadpool(edge_heads, store, request.path_params["name"], engine, body)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    async def qk(request: Request) -> JSONResponse:
        body = await _json_object(request, {"layer", "head", "query", "key", "top"})
        result = await run_in_threadpool(head_qk, store, request.path_params["name"], engine, features, body)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    def needs_personas() -> Personas:
        if persona_set is None:
            raise StoreError("this server has no persona vectors (start it with --persona FILE)", 404)
        return persona_set

    def list_personas(request: Request) -> JSONResponse:
        return JSONResponse(persona_set.summaries() if persona_set is not None else [])

    async def project_persona(request: Request) -> JSONResponse:
        vectors = needs_personas()
        body = await _json_object(request)
        result = await run_in_threadpool(vectors.project, request.path_params["persona"], body)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    async def steer_persona(request: Request) -> JSONResponse:
        vectors = needs_personas()
        body = await _json_object(request)
        result = await run_in_threadpool(vectors.steer, request.path_params["persona"], body)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    async def graph_persona(request: Request) -> JSONResponse:
        vectors = needs_personas()
        result = await run_in_threadpool(
            vectors.graph_projections,
            store,
            request.path_params["name"],
            request.path_params["persona"],
            request.query_params.get("layer"),
        )
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    def needs_features() -> FeatureStore:
        if features is None:
            raise StoreError("this server has no feature database (start it with --features)", 404)
        return features

    async def get_feature(request: Request) -> JSONResponse:
        layer, feature = _feature_key(request)
        dashboard = await run_in_threadpool(needs_features().get, layer, feature)
        return JSONResponse(dashboard.as_json(), headers={"Cache-Control": "no-store"})

    async def search_features(request: Request) -> JSONResponse:
        database = needs_features()
        text = request.query_params.get("q", "")
        if len(text) > MAX_SEARCH:
            raise StoreError(f"the search text has {len(text)} characters; at most {MAX_SEARCH} are allowed")
        limit = _search_limit(request.query_params.get("limit", "20"))
        hits = await run_in_threadpool(database.search, text, limit)
        return JSONResponse({"hits": [_json(hit) for hit in hits]})

    async def set_feature_label(request: Request) -> JSONResponse:
        database = needs_features()
        layer, feature = _feature_key(request)
        body = await _json_object(request, {"text", "author"})
        text, author = _label_fields(body)
        saved = await run_in_threadpool(lambda: database.set_label(layer, feature, text, author=author))
        history = await run_in_threadpool(database.label_history, layer, feature)
        current = current_label(history)
        return JSONResponse(
            {
                "saved": _json(saved),
                "label": None if current is None else _json(current),
                "labels": [_json(label) for label in history],
            }
        )

    routes = [
        Route("/", page),
        Route("/graph/{name}", page),
        Route("/compare/{a}/{b}", compare_page),
        Route("/static/{asset}", asset),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/config", config),
        Route("/api/graphs", list_graphs),
        Route("/api/graphs/{name}", get_graph, methods=["GET"]),
        Route("/api/graphs/{name}", delete, methods=["DELETE"]),
        Route("/api/graphs/{name}/state", save_state, methods=["PUT"]),
        Route("/api/graphs/{name}/rename", rename, methods=["POST"]),
        Route("/api/graphs/{name}/links", links, methods=["GET"]),
        Route("/api/graphs/{name}/scores", scores, methods=["POST"]),
        Route("/api/graphs/{name}/intervene", intervene, methods=["POST"]),
        Route("/api/graphs/{name}/heads", list_heads, methods=["GET"]),
        Route("/api/graphs/{name}/heads", split_edge, methods=["POST"]),
        Route("/api/graphs/{name}/qk", qk, methods=["POST"]),
        Route("/api/graphs/{name}/persona/{persona}", graph_persona, methods=["GET"]),
        Route("/api/personas", list_personas, methods=["GET"]),
        Route("/api/personas/{persona}/project", project_persona, methods=["POST"]),
        Route("/api/personas/{persona}/steer", steer_persona, methods=["POST"]),
        Route("/api/compare/{a}/{b}", compare, methods=["GET"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/api/features/search", search_features, methods=["GET"]),
        Route("/api/features/{layer}/{feature}", get_feature, methods=["GET"]),
        Route("/api/features/{layer}/{feature}/label", set_feature_label, methods=["PUT"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if jobs is not None:
            await run_in_threadpool(jobs.close)

    app = Starlette(
        routes=routes,
        exception_handlers={
            StoreError: _store_error,
            CircuitmapError: _user_error,
            HTTPException: _http_error,
            OSError: _system_error,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    return Guard(app, allowed_hosts, max_body)


def labelled_document(data: bytes, features: FeatureStore) -> bytes:
    """A stored graph document with its unlabelled feature nodes labelled from ``features``; the bytes as
    they are when nothing needs a label or the document cannot be read (or names a node id wrongly)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return data
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        return data
    try:
        if not unlabelled_features(document):
            return data
        add_feature_labels(document, features)
    except CircuitmapError:
        return data
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loaded_graph(store: GraphStore, name: str, features: FeatureStore | None) -> LoadedGraph:
    """Graph ``name`` as a comparison reads it: its full graph (404 without one) and its document, with the
    labels of ``features`` for its unlabelled feature nodes when given."""
    graph = store.full_graph(name)
    data, _ = store.read(name)
    if features is not None:
        data = labelled_document(data, features)
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise StoreError(f"graph {name!r} has an unreadable {DOCUMENT_FILE}: {error}", 500) from None
    return LoadedGraph(name, graph, document)


def _features_summary(features: FeatureStore | None) -> dict | None:
    """What ``/api/config`` says of the feature database: its set, its size and the corpus tokens read."""
    if features is None:
        return None
    meta = features.meta
    return {
        "model": meta.get("model"),
        "transcoders": meta.get("transcoders"),
        "n_layers": features.n_layers,
        "d_features": features.d_features,
        "tokens": int(meta.get("tokens_done", "0") or 0),
    }


def _feature_key(request: Request) -> tuple[int, int]:
    """(layer, feature) from the path, or a 400 error naming what is wrong."""
    layer, feature = request.path_params["layer"], request.path_params["feature"]
    for name, value in (("layer", layer), ("feature", feature)):
        if not _INDEX.fullmatch(value):
            raise StoreError(f"the {name} must be a whole number, got {value[:40]!r}")
    return int(layer), int(feature)


def _search_limit(value: str) -> int:
    """The ``limit`` query parameter: 1 to ``MAX_SEARCH_HITS``."""
    if not _INDEX.fullmatch(value) or not 1 <= int(value) <= MAX_SEARCH_HITS:
        raise StoreError(f"limit must be a whole number from 1 to {MAX_SEARCH_HITS}, got {value[:40]!r}")
    return int(value)


def _label_fields(body: dict) -> tuple[str, str | None]:
    """The text and author of a label edit, checked."""
    text, author = body.get("text"), body.get("author")
    check_text("the label text (empty clears the manual label)", text, empty=True)
    if author is not None:
        check_text("the author", author, empty=True)
    author = " ".join(author.split()) if author else None
    if author and len(author) > MAX_AUTHOR:
        raise StoreError(f"an author name has at most {MAX_AUTHOR} characters, got {len(author)}")
    return text, author or None


def _json(value: object) -> dict:
    """A dataclass as a JSON-ready dict."""
    return json.loads(json.dumps(asdict(value)))


class Guard:
    """ASGI middleware: the host, origin, content-type and body-size rules of the module docstring."""

    def __init__(self, app: Starlette, allowed_hosts: frozenset[str] | None, max_body: int):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(scope["method"], headers)
        if refusal is not None:
            await _error(refusal[1], refusal[0])(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), _with_headers(send))

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        host = _host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return 421, f"requests must address this machine (localhost), not {host or 'no host'}"
        if method in _SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").strip().lower():
            return 403, "cross-origin requests are refused"
        if method in ("POST", "PUT") and not headers.get("content-type", "").startswith("application/json"):
            return 415, "send the request body as application/json"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"the request body is larger than {self.max_body:,} bytes"
        return None

    def _limited(self, receive: Callable):
        received = 0
        limit = self.max_body

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        return limited


class BodyTooLarge(Exception):
    """A streamed request body went past the limit."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit:,} bytes")


def _with_headers(send: Callable):
    """Add the security headers to every response."""

    async def sending(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers += [
                (b"x-content-type-options", b"nosniff"),
                (b"referrer-policy", b"no-referrer"),
                (b"x-frame-options", b"DENY"),
                (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            ]
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _host_name(netloc: str) -> str:
    """The host part of a ``Host`` header or URL authority, without port or brackets, lower case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


async def _json_object(request: Request, fields: set[str] | None = None) -> dict:
    """The request body as a JSON object (holding only ``fields``, when given), or a 400/413 error."""
    try:
        body = await request.body()
    except BodyTooLarge as error:
        raise StoreError(str(error), 413) from None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise StoreError("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise StoreError("the request body must be a JSON object")
    unknown = set(value) - fields if fields is not None else set()
    if unknown:
        raise StoreError(f"unknown fields: {', '.join(sorted(unknown))}")
    return value


def _asset_response(assets: dict[str, bytes], name: str) -> Response:
    return Response(
        assets[name], media_type=ASSET_TYPES[Path(name).suffix], headers={"Cache-Control": "no-cache"}
    )


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


async def _store_error(request: Request, error: StoreError) -> JSONResponse:
    return _error(str(error), error.status)


async def _user_error(request: Request, error: CircuitmapError) -> JSONResponse:
    return _error(str(error), 400)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error(str(error.detail), error.status_code)


async def _system_error(request: Request, error: OSError) -> JSONResponse:
    """A file the server could not read or write: 507 for a full disk, else 500, with the system's reason."""
    status = 507 if error.errno == errno.ENOSPC else 500
    return _error(f"the server could not read or write a file: {error.strerror or error}", status)


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return _error(f"internal error: {type(error).__name__}: {error}", 500)
