"""Helpers for the browser tests and the explorer benchmark: whether a browser is at hand, a headless
Chromium, the explorer app served on a local port, opening a graph and clicking its nodes, synthetic viewer
documents, the exported page, and in-page timing of first paint, hover and click."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from circuitmap.graphs.folder import DOCUMENT_FILE
from circuitmap.server import export_html
from helpers.models import REPO

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    expect = sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NODE_THRESHOLD = 0.8
VIEWPORT = {"width": 1400, "height": 900}
READY = "() => document.body.dataset.ready === '1'"  # the page has drawn its graph (or its list)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if sync_playwright is None:
        return "the playwright package is not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    return None


def skip_without_browser() -> None:
    """Called at the top of a browser test module: skips the module when Chromium or playwright is missing,
    except in CI (CI=true), where a missing browser is a failure."""
    missing = missing_browser()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {missing}", pytrace=False)
    if missing:
        pytest.skip(f"browser tests skipped: {missing}", allow_module_level=True)


def artifacts_folder() -> Path:
    """Where browser tests save screenshots: $CIRCUITMAP_TEST_ARTIFACTS, or test-artifacts/screenshots."""
    folder = Path(os.environ.get("CIRCUITMAP_TEST_ARTIFACTS") or REPO / "test-artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launch_chromium(playwright):
    """Debian's Chromium, headless, with nothing that reaches the network on its own."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class Served:
    """The explorer app run by uvicorn in a background thread on a free local port."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the explorer server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def open_graph(page, url: str) -> None:
    """Go to ``url`` and wait until the page has drawn."""
    page.goto(url)
    page.wait_for_function(READY)


def node_position(page, node_id: str) -> dict:
    """Where node ``node_id`` is drawn, in page coordinates."""
    return page.evaluate("id => window.circuitmapExplorer.nodeScreenPosition(id)", node_id)


def show_full_graph(page) -> None:
    """Switch to the full graph's canvas if the page opened on the grouped view, and wait until the canvas has
    settled (a canvas that was hidden learns its size from the resize observer, a frame or two later)."""
    if page.get_by_test_id("graph-canvas").is_hidden():
        page.get_by_test_id("mode-full").click()
        expect(page.get_by_test_id("graph-canvas")).to_be_visible()
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def click_node(page, node_id: str) -> None:
    """Click a node on the full graph's canvas with the real mouse and wait for the panel to show it."""
    show_full_graph(page)
    at = node_position(page, node_id)
    page.mouse.click(at["x"], at["y"])
    expect(page.get_by_test_id("node-id")).to_have_text(node_id)


def top_features(document: dict, count: int) -> list[str]:
    """The ``count`` most influential feature ids of a document."""
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return [n["node_id"] for n in sorted(features, key=lambda n: n["influence"])[:count]]


def read_document(graphs: Path, name: str) -> dict:
    """The viewer document of graph ``name`` in the graph folder ``graphs``, as on disk now."""
    return json.loads((graphs / name / DOCUMENT_FILE).read_text(encoding="utf-8"))


def write_exported_html(document: dict, path: Path) -> Path:
    """The one-file exported page of ``document``, as ``circuitmap export-html`` writes it."""
    return Path(export_html(document, path))


def cantor_pair(layer: int, index: int) -> int:
    """The ``feature`` number of a feature node (as the exporter writes it)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def synthetic_document(
    n_nodes: int = 5000,
    n_links: int = 100_000,
    *,
    n_layers: int = 30,
    n_positions: int = 20,
    n_targets: int = 5,
    seed: int = 0,
    lens: bool = False,
) -> dict:
    """A schema-valid viewer document of about ``n_nodes`` nodes and exactly ``n_links`` links.

    One token per position; targets at the last position; error nodes in random (layer, position) cells;
    features spread over layers and leaning towards later positions; influence shares from log-normal
    influences (so a few nodes hold most of it), all within the default node threshold as in a pruned
    document; links go from lower rows at the same or earlier positions,
    half of them within a position, with heavy-tailed signed weights. ``lens`` adds logit-lens lists to
    features.
    """
    rng = np.random.default_rng(seed)
    n_cells = n_layers * n_positions
    n_errors = min(n_cells, n_nodes // 8)
    n_features = n_nodes - n_positions - n_targets - n_errors
    token_ids = rng.choice(np.arange(3, 50_000), size=n_positions + n_targets, replace=False)
    tokens = [f" w{int(t) % 997}" for t in token_ids[:n_positions]]
    tokens[0] = "<bos>"

    position_weight = np.linspace(1.0, 3.0, n_positions)
    feature_pos = rng.choice(n_positions, size=n_features, p=position_weight / position_weight.sum())
    feature_layer = rng.integers(0, n_layers, size=n_features)
    feature_index = rng.choice(16_384, size=n_features)
    cells = zip(feature_layer.tolist(), feature_index.tolist(), feature_pos.tolist(), strict=True)
    features = sorted(set(cells))
    error_cells = sorted(rng.choice(n_cells, size=n_errors, replace=False).tolist())
    errors = [(cell // n_positions, cell % n_positions) for cell in error_cells]
    last = n_positions - 1

    kind = np.array([0] * len(features) + [1] * len(errors) + [2] * n_positions + [3] * n_targets)
    token_layers, target_layers = [-1] * n_positions, [n_layers] * n_targets
    layer = np.array([f[0] for f in features] + [e[0] for e in errors] + token_layers + target_layers)
    pos = np.array(
        [f[2] for f in features] + [e[1] for e in errors] + list(range(n_positions)) + [last] * n_targets
    )
    shares = _influence_shares(rng, kind, NODE_THRESHOLD)
    src, dst = _random_links(rng, kind, layer, pos, n_links)
    weights = rng.normal(0.25, 1.0, size=n_links) * np.exp(rng.normal(0.0, 1.0, size=n_links))

    nodes = []
    for n, (at, index, p) in enumerate(features):
        node = _node(f"{at}_{index}_{p}", cantor_pair(at, index), str(at), p, "cross layer transcoder")
        node.update(clerp=f"synthetic feature {n}" if n % 5 == 0 else "", influence=float(shares[n]))
        node["activation"] = float(rng.uniform(0.05, 8.0))
        if lens:
            node["lens"] = {
                "top": [[f" up{n}_{k}", round(3.0 - k * 0.4, 3)] for k in range(5)],
                "bottom": [[f" down{n}_{k}", round(-3.0 + k * 0.4, 3)] for k in range(5)],
            }
        nodes.append(node)
    for k, (at, p) in enumerate(errors):
        node = _node(f"err_{at}_{p}", -1, str(at), p, "mlp reconstruction error")
        node["influence"] = float(shares[len(features) + k])
        nodes.append(node)
    for p in range(n_positions):
        nodes.append(_node(f"E_{int(token_ids[p])}_{p}", p, "E", p, "embedding", clerp=tokens[p]))
    probabilities = np.sort(rng.dirichlet(np.ones(n_targets)))[::-1] * 0.9
    for k in range(n_targets):
        token_id = int(token_ids[n_positions + k])
        node = _node(f"{n_layers + 1}_{token_id}_{last}", token_id, str(n_layers + 1), last, "logit")
        node.update(
            clerp=f'Output " out{k}" (p={probabilities[k]:.3f})',
            token_prob=float(round(probabilities[k], 6)),
            is_target_logit=k == 0,
        )
        nodes.append(node)

    ids = [node["node_id"] for node in nodes]
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for s, t, w in zip(src.tolist(), dst.tolist(), weights.tolist(), strict=True)
    ]
    counts = {"full": len(nodes), "exported": len(nodes)}
    metadata = {
        "slug": f"synthetic-{len(nodes)}",
        "scan": "synthetic",
        "prompt": "".join(tokens[1:]).strip(),
        "prompt_tokens": tokens,
        "node_threshold": NODE_THRESHOLD,
        "edge_threshold": 0.98,
        "schema_version": 1,
        "pruned": False,
        "model": "synthetic-model",
        "transcoders": "synthetic-transcoders",
        "scores": {
            "full": {"replacement": 0.71, "completeness": 0.9},
            "exported": {"replacement": 0.71, "completeness": 0.9},
        },
        "n_nodes": counts,
        "n_edges": {"full": len(links), "exported": len(links)},
        "info": {"synthetic": True, "seed": seed},
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _node(node_id: str, feature: int, layer: str, position: int, feature_type: str, clerp: str = "") -> dict:
    """A node with the exporter's fields and the neutral values of tokens and targets."""
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": position,
        "feature_type": feature_type,
        "jsNodeId": node_id,
        "clerp": clerp,
        "influence": None,
        "activation": None,
        "token_prob": 0.0,
        "is_target_logit": False,
    }


def _influence_shares(rng: np.random.Generator, kind: np.ndarray, threshold: float) -> np.ndarray:
    """Per feature and error, the share of influence held by those ranked above it (NaN elsewhere), as in a
    document pruned at ``threshold``: every share is below it, so the default view shows every node."""
    candidates = np.flatnonzero(kind <= 1)
    values = rng.lognormal(0.0, 1.6, size=len(candidates)) * np.where(kind[candidates] == 1, 3.0, 1.0)
    order = np.argsort(-values, kind="stable")
    from_here = np.cumsum(values[order[::-1]])[::-1]
    shares = np.full(len(kind), np.nan)
    shares[candidates[order]] = np.clip(1.0 - from_here / values.sum(), 0.0, 1.0) * threshold
    return shares


def _random_links(
    rng: np.random.Generator, kind: np.ndarray, layer: np.ndarray, pos: np.ndarray, n_links: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n_links`` distinct (source, target) pairs: targets are features and logits, sources sit on a lower
    row (tokens lowest) at the same or an earlier position; half the sources share the target's position."""
    n = len(kind)
    row = np.where(kind == 2, -1, layer)
    targets = np.flatnonzero((kind == 0) | (kind == 3))
    target_weight = np.where(kind[targets] == 3, 40.0, 1.0)
    sources = np.flatnonzero(kind != 3)
    by_pos = sources[np.argsort(pos[sources], kind="stable")]
    starts = np.searchsorted(pos[by_pos], np.arange(pos.max() + 2))
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < n_links:
        t = rng.choice(targets, size=n_links, p=target_weight / target_weight.sum())
        s = rng.choice(sources, size=n_links)
        local = rng.random(n_links) < 0.5
        low, high = starts[pos[t]], starts[pos[t] + 1]
        s[local] = by_pos[low[local] + (rng.random(local.sum()) * (high - low)[local]).astype(np.int64)]
        ok = (row[s] < row[t]) & (pos[s] <= pos[t])
        fresh = s[ok].astype(np.int64) * n + t[ok]
        keys = np.concatenate([keys, fresh])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
    keys = keys[:n_links]
    return keys // n, keys % n


def pick_nodes(document: dict, count: int) -> list[str]:
    """Ids to hover and click: the target with most incoming links, then the most influential features."""
    incoming: dict[str, int] = {}
    for link in document["links"]:
        incoming[link["target"]] = incoming.get(link["target"], 0) + 1
    targets = [n["node_id"] for n in document["nodes"] if n["feature_type"] == "logit"]
    features = sorted(
        (n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: n["influence"],
    )
    busiest = max(targets, key=lambda node: incoming.get(node, 0))
    return [busiest, *[n["node_id"] for n in features[: count - 1]]]


# Hover then click each node by dispatching pointer events on the canvas; each latency runs from the event
# to the first frame after the tooltip or panel shows the node (a requestAnimationFrame, then a task).
MEASURE_SCRIPT = """
async (ids) => {
  const overlay = document.querySelector('[data-testid="graph-overlay"]');
  const nextFrame = () => new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
  const hover = [];
  const click = [];
  for (const id of ids) {
    await nextFrame();
    const at = window.circuitmapExplorer.nodeScreenPosition(id);
    const where = { clientX: at.x, clientY: at.y, bubbles: true };
    let start = performance.now();
    overlay.dispatchEvent(new PointerEvent('pointermove', Object.assign({ pointerId: 1 }, where)));
    if (document.getElementById('tooltip').dataset.nodeId !== id) throw new Error('no tooltip for ' + id);
    await nextFrame();
    hover.push(performance.now() - start);
    start = performance.now();
    overlay.dispatchEvent(new MouseEvent('click', where));
    if (document.getElementById('node-id').textContent !== id) throw new Error('no panel for ' + id);
    await nextFrame();
    click.push(performance.now() - start);
  }
  return { hover, click };
}
"""


def measure_page(page, url: str, node_ids: list[str], timeout_ms: float = 30_000) -> dict:
    """Open ``url``, wait for the first draw, then time hovers and clicks on ``node_ids``.

    Returns, in milliseconds: first paint (navigation start to the end of the first full draw), first frame
    (to the frame after the one showing that draw, so rasterising it is counted), the base draw alone, and
    the hover and click latencies, measured once the first frame is out.
    """
    page.goto(url)
    page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=timeout_ms)
    page.wait_for_function("() => window.circuitmapTimings.firstFrameMs !== null", timeout=timeout_ms)
    timings = page.evaluate("window.circuitmapTimings")
    latencies = page.evaluate(MEASURE_SCRIPT, node_ids)
    return {
        "first_paint_ms": timings["firstPaintMs"],
        "first_frame_ms": timings["firstFrameMs"],
        "base_draw_ms": timings["baseDrawMs"],
        "hover_ms": latencies["hover"],
        "click_ms": latencies["click"],
    }
