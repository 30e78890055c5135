"""The Colab notebook runs from top to bottom as shipped, in a fresh folder (its WORKDIR
is a relative path) holding an uploaded wheel, on 8 fake CPU devices (a Colab TPU's
core count). Two things are stood in for: pip, by a fake ``pip`` module that records
what the install cell asks for, and the training of the shipped ``seed`` preset (hours
on a CPU), by ``tiny``'s: run_mnist records the config the notebook passes and trains
``tiny`` in its place."""

import json
import os

import pytest
from conftest import REPO, xla_flags

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

NOTEBOOK = REPO / "experiments" / "colab_mnist.ipynb"

FAKE_PIP = """\
import json, sys
with open({record!r}, "a") as f:
    f.write(json.dumps({{"executable": sys.executable, "args": sys.argv[1:]}}) + "\\n")
"""

# Put before the training cell: what it passes to run_mnist is printed, tiny is trained.
RECORD_RUN = """\
import json as _json
import sys as _sys

import sae_jax.commands.train as _experiment
from sae_jax.config.files import config_to_json as _to_json
from sae_jax.config import tiny as _tiny


_run_mnist = _experiment.run_mnist


def _recorded(config, workdir, **kwargs):
    asked = {"config": _to_json(config), "workdir": workdir, "kwargs": kwargs}
    print("run_mnist:", _json.dumps({**asked, "executable": _sys.executable}))
    return _run_mnist(_tiny(), workdir, **kwargs)


_experiment.run_mnist = _recorded
"""


def _notebook(path):
    """The notebook at ``path`` and what its ``parameters`` cell defines (skip without
    the notebook packages)."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    shipped = {}
    exec(params.source, shipped)
    return nb, shipped


def _execute(nb, folder) -> tuple[list, str]:
    """Run ``nb`` in ``folder`` with the python3 kernel (raising on the first cell that
    fails); its outputs, and their text."""
    import nbclient

    resources = {"metadata": {"path": str(folder)}}
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return outputs, "".join(o.get("text", "") for o in outputs)


def test_colab_notebook_runs_as_shipped_on_8_devices(tmp_path, monkeypatch):
    nb, shipped = _notebook(NOTEBOOK)
    import nbformat

    import sae_jax
    from sae_jax.config import seed
    from sae_jax.config.files import config_to_json

    assert shipped["PRESET"] == "seed" and shipped["INSTALL"] is True
    assert shipped["WORKDIR"] == "checkpoints/mnist" and shipped["SAE_JAX_SOURCE"] is None

    fake = tmp_path / "fake_pip"
    (fake / "pip").mkdir(parents=True)
    (fake / "pip" / "__init__.py").write_text("")
    record = tmp_path / "pip_calls.jsonl"
    (fake / "pip" / "__main__.py").write_text(FAKE_PIP.format(record=str(record)))
    path = [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))  # the kernel's, and pip's
    monkeypatch.setenv("XLA_FLAGS", xla_flags(8))
    (train,) = [i for i, c in enumerate(nb.cells) if "run_mnist(" in c.source]
    nb.cells.insert(train, nbformat.v4.new_code_cell(RECORD_RUN))

    workspace = tmp_path / "runtime"
    workspace.mkdir()
    wheel = f"sae_jax-{sae_jax.__version__}-py3-none-any.whl"  # as python -m build names it
    (workspace / wheel).write_bytes(b"")  # uploaded
    outputs, text = _execute(nb, workspace)

    # The install cell: one pip install of the uploaded wheel with its tfds extra, into
    # the kernel's own Python.
    (line,) = [line for line in text.splitlines() if line.startswith("run_mnist: ")]
    asked = json.loads(line.removeprefix("run_mnist: "))
    (call,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert call["executable"] == asked["executable"]
    assert call["args"] == ["install", "-q", f"{wheel}[tfds]"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'name = "sae-jax"' in pyproject and "\ntfds = [" in pyproject

    # The training cell asked for the seed preset in WORKDIR, over the 8 devices.
    assert asked["config"] == config_to_json(seed())
    assert asked["workdir"] == "checkpoints/mnist"
    assert asked["kwargs"] == {"data_parallel": True}

    assert "on cpu: 8 device(s)" in text
    assert "batch_size=25 does not divide over the 8 devices: training on 5 of them" in text
    assert "test accuracy 0." in text and "MNIST: bundled sample" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    summary = json.loads((workspace / "checkpoints" / "mnist" / "summary.json").read_text())
    assert summary["config"]["name"] == "tiny" and summary["devices"] == 5


def test_the_install_cell_without_a_wheel_or_a_source_says_what_to_upload(tmp_path):
    nb, shipped = _notebook(NOTEBOOK)
    (install,) = [c for c in nb.cells if "pip" in c.source and c.cell_type == "code"]
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"^no sae_jax wheel here: upload dist/"):
            exec(install.source, dict(shipped))
    finally:
        os.chdir(here)


def test_no_notebook_installs_from_a_placeholder():
    for notebook in [*REPO.glob("experiments/*.ipynb"), *REPO.glob("docs/*.ipynb")]:
        text = notebook.read_text()
        assert "OWNER" not in text and "git+https:" not in text, notebook


# The tutorial notebook is executed by the documentation build, and its outputs are
# checked there: tests/test_docs.py::test_tutorial_executed_at_build_time.
