"""The Colab notebook runs from top to bottom on CPU, with its own default WORKDIR (a
relative path) in a fresh folder; only the preset and the install step are changed."""

import pytest
from conftest import REPO

NOTEBOOK = REPO / "experiments" / "colab_mnist.ipynb"


def test_colab_notebook_runs_on_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert 'WORKDIR = "checkpoints/mnist"' in params.source
    for shipped, test in [
        ('PRESET = "seed"', 'PRESET = "tiny"'),
        ("INSTALL = True", "INSTALL = False"),
    ]:
        assert shipped in params.source
        params.source = params.source.replace(shipped, test)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "on cpu: 1 device(s)" in text
    assert "test accuracy 0." in text and "MNIST: bundled sample" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert (tmp_path / "checkpoints" / "mnist" / "summary.json").exists()
