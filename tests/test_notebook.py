"""The notebook walkthrough (issue 8): stored without outputs, in step with its builder,
and executed end to end on synthetic data in fast mode: a failing cell fails the suite."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "busi_pipeline.ipynb"


def test_notebook_is_stored_without_outputs_and_matches_its_builder():
    builder = runpy.run_path(str(REPO / "notebooks" / "build_notebook.py"))
    assert NOTEBOOK.read_text() == builder["render"](), "run python notebooks/build_notebook.py and commit"
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    params = code[0]
    assert params["metadata"].get("tags") == ["parameters"]
    src = "".join(params["source"])
    assert "DATA_DIR = None" in src and "FAST = True" in src
    headings = [c["source"][0] for c in nb["cells"] if c["cell_type"] == "markdown" and c["source"][0].startswith("## ")]
    assert len(headings) >= 13, headings  # parameters, 12 stages, where next


@pytest.mark.slow
def test_notebook_executes_end_to_end_in_fast_mode(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    work = tmp_path / "work"
    # Inject the parameters as papermill would: a cell after the parameters cell.
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(f"DATA_DIR = None\nFAST = True\nWORK_DIR = {str(work)!r}"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) >= 10  # cases, EDA, near-duplicates, balancing, batch, overlays, CM, ROC, mask, gradients
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "near-duplicate pair is in" in text and "xplane.pb" in text
    assert (work / "models" / "busi_classifier" / "1" / "saved_model.pb").is_file()
    assert (work / "models" / "busi_segmenter" / "1" / "saved_model.pb").is_file()
    trials = json.loads((work / "tune" / "trials.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["COMPLETED", "COMPLETED"]
    assert "INFO:tensorflow" not in text and "Traceback" not in text
