"""The example notebooks in ``notebooks/`` run top to bottom without an error.

Each notebook is stored with its outputs (so it reads well unexecuted) and ends
with cells that assert its key results (K-FAC below SGD, relative errors against
dense references, vmap equal to a loop, ...) and print ``all checks passed``.
Here every notebook is copied to a temporary folder and re-executed there with
``nbclient`` on the ``python3`` kernel, so the stored copy is never touched and
whatever a notebook writes lands in the temporary folder. Together they run in
about three minutes on two CPU cores (each sets ``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = (
    "01_quick_start.ipynb",
    "02_curvature.ipynb",
    "03_ensembles.ipynb",
    "04_build_your_own.ipynb",
    "05_comparing_methods.ipynb",
    "06_laplace_uncertainty.ipynb",
    "07_continual_learning.ipynb",
    "08_pruning.ipynb",
)
# Seconds per cell: the slowest cell (05's `fprecond compare` run) takes about 1.5 minutes
# on a loaded 2-core machine; the margin absorbs slower machines without hiding a hang.
CELL_TIMEOUT = 600
DONE = "all checks passed"
MAX_STORED_BYTES = 1_000_000


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream" and output.get("name") == "stdout")


def test_every_notebook_is_tested() -> None:
    stored = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
    assert stored == sorted(NOTEBOOKS), f"notebooks/ holds {stored}; NOTEBOOKS lists {sorted(NOTEBOOKS)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_outputs(name: str) -> None:
    """The stored copy was executed in order, without errors, with its figures embedded."""
    path = NOTEBOOK_DIR / name
    assert path.stat().st_size < MAX_STORED_BYTES, f"{name} is {path.stat().st_size} bytes"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    cells = _code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), \
        f"{name}: stored without outputs, or not executed top to bottom"
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"], f"{name}: stored with an error"
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{name}: no figure stored"
    assert DONE in _stdout(cells[-1]), f"{name}: the stored run did not reach its checks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name: str, tmp_path: Path) -> None:
    """Re-execute a temporary copy; any exception (a failed check included) fails the test."""
    copy = tmp_path / name
    shutil.copyfile(NOTEBOOK_DIR / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    for cell in _code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    # The kernel imports the checkout's fprecond even where it is not installed.
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    client.execute(env={**os.environ, "PYTHONPATH": python_path})
    nbformat.write(notebook, copy)  # the executed copy, for inspection when a check fails
    assert DONE in _stdout(_code_cells(notebook)[-1]), f"{name}: the final checks did not run"
