"""Start the explorer: listen on an address, answer only for this machine's names, serve until stopped."""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.persona import PersonaVector
from circuitmap.server.app import LOCAL_HOSTS, check_bind, create_app, is_loopback
from circuitmap.server.jobs import Engine
from circuitmap.server.store import GraphStore
from circuitmap.validation import check_number

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


def allowed_hosts(host: str, extra: list[str]) -> frozenset[str] | None:
    """The names requests may address: the local names, ``host`` and ``extra``; on a network address also
    this machine's names and addresses. ``*`` in ``extra`` allows any (no DNS-rebinding protection)."""
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


def check_port(port: object) -> int:
    """``port`` if a server can listen on it (0 picks a free one); a one-line error otherwise."""
    return int(check_number("the port", port, low=0, high=65535, whole=True))


def run_explorer(
    graphs: str | Path,
    engine: Engine | None = None,
    host: str | None = None,
    port: int = DEFAULT_PORT,
    *,
    path: str = "/",
    allow_hosts: tuple[str, ...] = (),
    features: str | Path | None = None,
    personas: Mapping[str, PersonaVector] | None = None,
) -> None:
    """Serve the graph folder ``graphs`` until interrupted, after printing the URL of ``path``.

    With ``engine`` the page can compute new graphs and run interventions, and project on and steer with
    ``personas`` (vectors of its model by name); ``features`` is the feature database to show (default: the
    engine's set's own, when built). ``host`` defaults to loopback; another address must be given
    explicitly, and the server then warns that anyone who can reach it can edit.
    """
    check_port(port)
    explicit = host is not None
    host = host or DEFAULT_HOST
    check_bind(host, explicit)
    store = FeatureStore.open_for(engine.transcoders if engine is not None else None, features)
    if store is not None:
        print(f"feature database: {store.path}", flush=True)
    if not is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach this machine can read, edit and delete these "
            "graphs",
            file=sys.stderr,
        )
    graphs = Path(graphs)
    graphs.mkdir(parents=True, exist_ok=True)
    app = create_app(
        GraphStore(graphs),
        engine,
        features=store,
        personas=personas,
        allowed_hosts=allowed_hosts(host, list(allow_hosts)),
    )
    sock = bind(host, port)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    serve(app, sock, f"http://{shown}:{sock.getsockname()[1]}{path}")


def serve(app, sock: socket.socket, url: str) -> None:
    """Run ``app`` on the listening ``sock`` until interrupted, after printing the ``url`` to open."""
    import uvicorn

    print(f"circuitmap explorer: open {url}  (Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
