"""The notebooks run top to bottom (with a tiny config) so they never rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import laptop_env, tiny_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", laptop_env()["XLA_FLAGS"])  # the kernel's: one CPU device
    monkeypatch.setenv("SORA_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SORA_JAX_NOTEBOOK_DATA_DIR", tiny_data_dir())
    monkeypatch.setenv("SORA_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/gif" in o.get("data", {}) for o in outputs)
