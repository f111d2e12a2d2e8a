"""The notebooks run headless, top to bottom, on the shipped traces, and draw their plots."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["accuracy.ipynb"])
def test_notebook_executes_and_renders_its_plots(name):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:  # run what the file says, not what it last printed
        if cell.cell_type == "code":
            cell.outputs = []
    # a failing cell raises CellExecutionError, naming the cell
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "TPOT p50 off by" in text and "H200 with CUDA graphs" in text
