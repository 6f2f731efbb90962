"""Every notebook is stored without outputs, declares SMALL, and runs top to bottom with SMALL = True."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def code_outputs(notebook: nbformat.NotebookNode) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    assert not code_outputs(notebook), f"clear the outputs of {path.name} before committing"
    assert all(cell.execution_count is None for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_declares_small_in_its_parameters_cell(path):
    cell = run_notebooks.parameters_cell(nbformat.read(path, as_version=4))
    assert "SMALL =" in cell.source


def test_missing_parameters_cell_is_a_clear_error():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="parameters"):
        run_notebooks.parameters_cell(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_small(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = run_notebooks.execute(path, small=True, workdir=tmp_path, timeout=600)
    outputs = code_outputs(notebook)
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("ok" in output.get("text", "") for output in outputs), "the notebook's own checks ran"
    assert any("image/png" in output.get("data", {}) for output in outputs), "the notebook drew a figure"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            text = "".join(output.get("text", "") for output in cell.outputs)
            states = re.findall(r"[^\r\n]*\d+/\d+ \[", text)
            runs = sum(1 for state in states if re.match(r"fit:\s+0%", state))
            assert all(state.startswith("fit:") for state in states), (
                f"a bar other than RunProgressBar:\n{cell.source}"
            )
            assert len(states) <= 25 * max(runs, 1), f"progress bars flood this cell:\n{cell.source}"
