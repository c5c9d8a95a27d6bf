"""The graph explorer: a local web app over a folder of graphs, and self-contained HTML exports."""

from circuitmap.errors import StoreError
from circuitmap.server.app import check_bind, create_app
from circuitmap.server.export_html import export_html, render_html
from circuitmap.server.jobs import Engine, Jobs
from circuitmap.server.launch import run_explorer
from circuitmap.server.store import GraphStore

__all__ = [
    "Engine",
    "GraphStore",
    "Jobs",
    "StoreError",
    "check_bind",
    "create_app",
    "export_html",
    "render_html",
    "run_explorer",
]
