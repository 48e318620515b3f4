"""The example notebook, executed top to bottom by a real Jupyter kernel, as a user runs it."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import rows

NOTEBOOK = Path(__file__).parents[1] / "examples" / "noise_study.ipynb"


@pytest.mark.slow  # a kernel and a short study: about half a minute
def test_the_example_notebook_runs_in_a_real_kernel_and_writes_its_study(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_OUT", str(tmp_path / "study"))  # the kernel inherits the environment
    monkeypatch.setenv("MNIST_DIR", data_dir)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2  # the noisy images, the plot
    results = rows(tmp_path / "study" / "results.csv")
    assert sorted(float(r["noise_scale"]) for r in results) == [0.0, 0.5, 1.0, 2.0]
    assert "σ = 0    train" in "".join(output.get("text", "") for output in outputs)
