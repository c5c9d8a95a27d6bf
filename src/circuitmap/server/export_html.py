"""One self-contained HTML file of a graph: the explorer page with its scripts, styles and document inlined.

The file needs no server and no network: it opens from disk in any browser and shows the same view,
read-only (no saving, no new graphs), with subgraph scores computed in the page from the document's edges.
Head loadings stored with the graph (``server.heads.folder_heads``) can be inlined too: the page then shows
the heads that carry those edges.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError
from circuitmap.server.app import PAGE, package_assets

_STYLE_TAG = re.compile(r'<link rel="stylesheet" href="/static/([A-Za-z0-9_.-]+\.css)">')
_SCRIPT_TAG = re.compile(r'<script src="/static/([A-Za-z0-9_.-]+\.js)"></script>')
DOCUMENT_ID = "circuitmap-document"
HEADS_ID = "circuitmap-heads"


def render_html(document: dict, heads: dict | None = None) -> str:
    """The page with every asset and ``document`` inlined, and ``heads`` (stored head loadings, as
    ``server.heads.folder_heads`` gives them) when given."""
    assets = package_assets()
    page = assets[PAGE].decode("utf-8")
    if not _SCRIPT_TAG.search(page):
        raise CircuitmapError(f"the explorer page ({PAGE}) loads no scripts: the installation is incomplete")
    embedded = _json_script(DOCUMENT_ID, document, "the graph")
    if heads is not None:
        embedded += _json_script(HEADS_ID, heads, "the head loadings")
    inserted = False

    def style(match: re.Match) -> str:
        return f"<style>\n{_asset_text(assets, match.group(1))}\n</style>"

    def script(match: re.Match) -> str:
        nonlocal inserted
        prefix = "" if inserted else embedded
        inserted = True
        return f"{prefix}<script>\n{_script_safe(_asset_text(assets, match.group(1)))}\n</script>"

    return _SCRIPT_TAG.sub(script, _STYLE_TAG.sub(style, page))


def export_html(document: dict, path: str | Path, heads: dict | None = None) -> Path:
    """Write ``render_html(document, heads)`` to ``path`` atomically; returns the path."""
    path = Path(path)
    try:
        data = render_html(document, heads).encode("utf-8")
    except UnicodeEncodeError as error:
        raise CircuitmapError(f"the graph holds text that is not valid Unicode: {error}") from None
    atomic_write(path, lambda temporary: temporary.write_bytes(data))
    return path


def _json_script(identifier: str, value: dict, what: str) -> str:
    """A JSON data element holding ``value`` as strict JSON that cannot end the element early."""
    try:
        data = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise CircuitmapError(f"{what} cannot be written as strict JSON: {error}") from None
    safe_data = data.replace("<", "\\u003c")
    return f'<script id="{identifier}" type="application/json">{safe_data}</script>\n'


def _asset_text(assets: dict[str, bytes], name: str) -> str:
    if name not in assets:
        raise CircuitmapError(f"the explorer page refers to {name}, which the package lacks")
    return assets[name].decode("utf-8")


def _script_safe(code: str) -> str:
    """Script code that cannot end the ``<script>`` element it sits in: ``</script`` and ``<!--`` can only
    occur in its strings and comments, where ``<\\/`` and ``<\\!`` read the same."""
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE).replace("<!--", "<\\!--")
