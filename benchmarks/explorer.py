"""Explorer responsiveness on a large synthetic graph, or on a real graph folder, in headless Chromium.

usage: python benchmarks/explorer.py [--nodes 5000] [--links 100000] [--runs 5] [--keep PAGE.html]
       python benchmarks/explorer.py --graph GRAPH_FOLDER [--runs 5]

With --graph, the folder (as `circuitmap attribute --out` writes it) is served by the explorer and its page
opened once per run: the size of the document the page loads first, and first paint and first frame of the
view it opens on (the grouped view when the graph has supernodes), medians over runs.

Builds a schema-valid synthetic viewer document (30 layers, 20 positions, log-normal influence, links from
lower layers at the same or earlier positions), writes it as the one-file exported page, and opens it in
Debian's Chromium (/usr/bin/chromium, headless, GPU off) once per run, each time in a fresh browser context.
Per run it records first paint (navigation start to the end of the first full canvas draw), first frame
(to the frame after the one that showed it, so the browser's rasterising is counted), and the latency of a
hover and of a click on five nodes (the target with most incoming links and the four most influential
features), each from the dispatched pointer event to the first frame after the tooltip or panel shows the
node. Figures are medians over runs (latencies: median and worst over all runs' events), in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.browser import (  # noqa: E402  (the tests folder holds the shared browser helpers)
    CHROMIUM,
    VIEWPORT,
    Served,
    launch_chromium,
    measure_page,
    pick_nodes,
    synthetic_document,
    write_exported_html,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="also write the exported page to this file")
    parser.add_argument("--graph", type=Path, help="measure this graph folder's page instead")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is absent: install Debian's chromium package")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("the playwright package is not installed (pip install playwright)")
    if args.graph:
        measure_graph_folder(args.graph, args.runs, sync_playwright)
        return

    start = time.perf_counter()
    document = synthetic_document(args.nodes, args.links)
    targets = pick_nodes(document, 5)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        page_path = write_exported_html(document, args.keep or Path(folder) / "explorer.html")
        size = page_path.stat().st_size / 2**20
        print(
            f"document: {len(document['nodes']):,} nodes, {len(document['links']):,} links; "
            f"page {size:.1f} MiB, built in {time.perf_counter() - start:.1f} s"
        )
        runs = []
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            print(f"browser: Chromium {browser.version}, headless, GPU off")
            for _ in range(args.runs):
                context = browser.new_context(viewport=VIEWPORT)
                runs.append(measure_page(context.new_page(), page_path.as_uri(), targets, timeout_ms=120_000))
                context.close()
            browser.close()

    hovers = [ms for run in runs for ms in run["hover_ms"]]
    clicks = [ms for run in runs for ms in run["click_ms"]]
    print(
        f"first paint {statistics.median(r['first_paint_ms'] for r in runs):.0f} ms, "
        f"first frame {statistics.median(r['first_frame_ms'] for r in runs):.0f} ms "
        f"(base draw {statistics.median(r['base_draw_ms'] for r in runs):.0f} ms), "
        f"hover {statistics.median(hovers):.0f} ms (worst {max(hovers):.0f}), "
        f"click {statistics.median(clicks):.0f} ms (worst {max(clicks):.0f}) "
        f"(median of {len(runs)} runs, {len(hovers)} hovers and clicks)"
    )


def measure_graph_folder(folder: Path, runs: int, sync_playwright) -> None:
    """Size of a graph folder's document and first paint of its page, served by the explorer."""
    from circuitmap.server import create_app

    size = (folder / "graph.json").stat().st_size
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; document {size:,} bytes")
    timings = []
    with Served(create_app(folder.parent)) as base, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        for _ in range(runs):
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.goto(f"{base}/graph/{folder.name}")
            page.wait_for_selector('body[data-ready="1"]', state="attached", timeout=120_000)
            page.wait_for_function("() => window.circuitmapTimings.firstFrameMs !== null", timeout=120_000)
            timings.append(page.evaluate("window.circuitmapTimings"))
            context.close()
        browser.close()
    print(
        f"first paint {statistics.median(t['firstPaintMs'] for t in timings):.0f} ms, first frame "
        f"{statistics.median(t['firstFrameMs'] for t in timings):.0f} ms (median of {len(timings)} runs)"
    )


if __name__ == "__main__":
    main()
