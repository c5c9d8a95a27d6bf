"""Shared fixtures: every tiny model family, the explorer's engine and a graph computed on it, and a headless
browser with a fresh page per test. The builders they use live in ``helpers``."""

from __future__ import annotations

import pytest
import torch
from helpers.graphs import SERVER_PROMPT
from helpers.models import FAMILIES, tiny_model
from helpers.transcoders import random_transcoders


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine():
    """The explorer's engine on a tiny float64 llama with random skip-PLT transcoders."""
    from circuitmap.server import Engine

    model = tiny_model("llama", dtype=torch.float64)
    transcoders = random_transcoders("plt-topk-skip", 3, 32).to(dtype=torch.float64)
    return Engine(model, transcoders, model_spec="tiny-llama", transcoders_spec="random")


@pytest.fixture(scope="module")
def computed(engine):
    """The graph of ``SERVER_PROMPT`` on the engine and its viewer document (with the logit lens)."""
    from circuitmap.attribution import attribute
    from circuitmap.features import add_logit_lens
    from circuitmap.graphs.export import graph_json

    graph = attribute(engine.model, engine.transcoders, SERVER_PROMPT, progress=False)
    document = add_logit_lens(graph_json(graph, node_threshold=0.9), engine.model, engine.transcoders)
    return graph, document


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for the browser tests (their modules skip when it or playwright is missing)."""
    from helpers.browser import launch_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page; the test fails on any uncaught error in the page's scripts."""
    from helpers.browser import VIEWPORT

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"
