"""The ``serve`` and ``export-html`` commands: explore graphs in a browser, or share one as a single file."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from circuitmap.errors import CircuitmapError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8041
DEFAULT_GRAPHS = "circuitmap-graphs"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line error saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise CircuitmapError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(app, sock: socket.socket, url: str) -> None:
    """Run ``app`` on ``sock`` until interrupted, after printing the URL to open."""
    import uvicorn

    print(f"circuitmap explorer: open {url}  (Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def allowed_hosts(host: str, extra: list[str]) -> frozenset[str] | None:
    """The names requests may address: the local names, ``host`` and ``extra``; on a network address also
    this machine's names and addresses. ``*`` in ``extra`` allows any (no DNS-rebinding protection)."""
    from circuitmap.server.app import LOCAL_HOSTS, is_loopback

    if "*" in extra:
        return None
    names = set(LOCAL_HOSTS) | {host.strip("[]").lower()} | {name.strip("[]").lower() for name in extra}
    if not is_loopback(host):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(name, None)}
            except OSError:
                continue
    return frozenset(names)


def open_features(path: str | None, transcoders):
    """The feature database to use: ``path`` (refused when built for another set than ``transcoders``),
    else the default database of ``transcoders`` when there is one, else None."""
    from circuitmap.features import FeatureStore, default_database_path

    if path is not None:
        return FeatureStore(path, transcoders=transcoders)
    if transcoders is None:
        return None
    default = default_database_path(transcoders)
    if not default.is_file():
        return None
    try:
        return FeatureStore(default, transcoders=transcoders)
    except CircuitmapError as error:
        print(f"warning: the default feature database is not used: {error}", file=sys.stderr)
        return None


def start_explorer(
    graphs: Path,
    engine,
    host: str | None,
    port: int,
    path: str = "/",
    allow_hosts: tuple[str, ...] = (),
    features: str | None = None,
) -> None:
    """Serve ``graphs`` (with ``engine`` to compute new ones, and the feature database ``features`` or the
    engine's default one) on ``host`` (default loopback) and ``port``."""
    from circuitmap.server import GraphStore, check_bind, create_app
    from circuitmap.server.app import is_loopback

    explicit = host is not None
    host = host or DEFAULT_HOST
    check_bind(host, explicit)
    store = open_features(features, engine.transcoders if engine is not None else None)
    if store is not None:
        print(f"feature database: {store.path}", flush=True)
    if not is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach this machine can read, edit and delete these "
            "graphs",
            file=sys.stderr,
        )
    graphs.mkdir(parents=True, exist_ok=True)
    app = create_app(
        GraphStore(graphs), engine, features=store, allowed_hosts=allowed_hosts(host, list(allow_hosts))
    )
    sock = bind(host, port)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    serve(app, sock, f"http://{shown}:{sock.getsockname()[1]}{path}")


def _cmd_serve(args: argparse.Namespace, load) -> int:
    if (args.model is None) != (args.transcoders is None):
        raise CircuitmapError(
            "--model and --transcoders go together: give both to compute graphs, or neither"
        )
    engine = None
    if args.model is not None:
        from circuitmap.server import Engine
        from circuitmap.transcoders import load_transcoders

        model = load(args)
        engine = Engine(
            model,
            load_transcoders(args.transcoders),
            model_spec=args.model,
            transcoders_spec=args.transcoders,
            max_feature_nodes=args.max_feature_nodes,
        )
    start_explorer(
        Path(args.graphs),
        engine,
        args.host,
        args.port,
        allow_hosts=tuple(args.allow_host),
        features=args.features,
    )
    return 0


def load_document(source: Path, node_threshold: float, edge_threshold: float) -> dict:
    """The viewer document of a graph folder, a ``graph.json``, or a ``.safetensors`` graph (pruned now)."""
    from circuitmap.graphs.export import graph_json
    from circuitmap.graphs.files import load_graph
    from circuitmap.server.store import DOCUMENT, FULL_GRAPH

    if source.is_dir():
        candidates = [source / DOCUMENT, source / FULL_GRAPH]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise CircuitmapError(f"{source} holds neither {DOCUMENT} nor {FULL_GRAPH}")
        source = found
    if not source.is_file():
        raise CircuitmapError(f"no graph at {source}")
    if source.suffix == ".safetensors":
        return graph_json(load_graph(source), node_threshold=node_threshold, edge_threshold=edge_threshold)
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CircuitmapError(f"{source} is not a viewer JSON document: {error}") from None
    if not isinstance(document, dict) or not {"metadata", "nodes", "links"} <= set(document):
        raise CircuitmapError(f"{source} is not a viewer JSON document (it needs metadata, nodes and links)")
    return document


def _cmd_export_html(args: argparse.Namespace) -> int:
    from circuitmap.server import export_html

    document = load_document(Path(args.graph), args.node_threshold, args.edge_threshold)
    if args.features:
        from circuitmap.features import FeatureStore
        from circuitmap.features.graph_labels import add_feature_labels

        with FeatureStore(args.features) as store:
            add_feature_labels(document, store)
    out = Path(args.output)
    if out.is_dir():
        raise CircuitmapError(f"-o {out} is a folder: name the .html file to write")
    path = export_html(document, out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): open it in any browser, no server needed")
    return 0


def add_explorer_args(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port``, ``--allow-host`` and ``--features``: where the explorer listens, whom it
    answers, and the feature database it shows."""
    parser.add_argument(
        "--host", help=f"address to listen on (default {DEFAULT_HOST}; others must be given explicitly)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name requests may address, e.g. behind a proxy (repeatable)",
    )
    parser.add_argument(
        "--features",
        metavar="DB",
        help="feature database to show dashboards and labels from (default: the transcoders' own, "
        "if it was built)",
    )


def add_server_commands(commands, add_model_args, load, positive_int) -> None:
    """Register ``serve`` and ``export-html`` on the top-level subparsers."""
    serve_parser = commands.add_parser("serve", help="explore graphs in the browser (a local web app)")
    serve_parser.add_argument(
        "--graphs", default=DEFAULT_GRAPHS, help=f"graph folder, one sub-folder per graph ({DEFAULT_GRAPHS})"
    )
    add_model_args(serve_parser)
    serve_parser.set_defaults(model=None)
    serve_parser.add_argument("--transcoders", help="with --model: compute new graphs from the browser")
    serve_parser.add_argument(
        "--max-feature-nodes",
        type=positive_int,
        help="cap on feature nodes of graphs computed from the browser",
    )
    add_explorer_args(serve_parser)
    serve_parser.set_defaults(run=lambda args: _cmd_serve(args, load))

    export = commands.add_parser(
        "export-html", help="write a graph as one self-contained HTML file that opens offline"
    )
    export.add_argument("graph", help="graph folder, graph.json, or graph.safetensors")
    export.add_argument("-o", "--output", required=True, help="the .html file to write")
    export.add_argument(
        "--node-threshold", type=float, default=0.8, help="pruning of a .safetensors graph (default 0.8)"
    )
    export.add_argument("--edge-threshold", type=float, default=0.98, help="(default 0.98)")
    export.add_argument("--features", help="feature database whose labels name unlabelled feature nodes")
    export.set_defaults(run=_cmd_export_html)
