"""notebooks/*.ipynb run top to bottom on CPU with the default model (cells that need a TPU or real GCS
print why they skip themselves)."""

from __future__ import annotations

import glob
import os

import pytest

from tests.server_support import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
pytestmark = pytest.mark.timeout(900)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this environment: the checkout first on its path, no real GCS prefix.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("JAXLLM_GCS_PREFIX", raising=False)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in text
    if "quickstart" in path:
        assert "skipped: set JAXLLM_GCS_PREFIX" in text and "server exited with 0" in text
    else:
        assert "concurrent requests" in text and "server exited with 0" in text
