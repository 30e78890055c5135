"""The documentation site builds with warnings as errors, executing the tutorial
notebook, and documents every public name at its public path."""

import html.parser
import os
import posixpath
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

import sae_jax
from sae_jax import corruption, losses

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("sphinx_book_theme")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once into ``tmp/site/html`` (myst-nb keeps the executed notebooks
    beside it, in ``tmp/site/jupyter_execute``), and the build's output."""
    out = tmp_path_factory.mktemp("site") / "html"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=os.environ,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    print(f"docs built in {seconds:.1f}s")
    return out


def documented(site) -> set[str]:
    """Every Python object of the built ``objects.inv``."""
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    return {name for kind, items in inventory.items() if kind.startswith("py:") for name in items}


def test_every_public_name_has_an_entry(site):
    names = documented(site)
    expected = [f"sae_jax.{n}" for n in sae_jax.__all__ if n != "__version__"]
    expected += [f"sae_jax.losses.{n}" for n in losses.__all__]
    expected += [f"sae_jax.corruption.{n}" for n in corruption.__all__]
    missing = [n for n in expected if n not in names]
    assert not missing, f"no entry in the API reference for {missing}"


def test_guides_and_tutorial_are_pages(site):
    guides = sorted(p.stem for p in (REPO / "docs" / "guides").glob("*.md"))
    assert len(guides) >= 9
    for page in ["index", "tutorial", *(f"guides/{g}" for g in guides)]:
        assert (site / f"{page}.html").is_file(), page
    assert len(list((site / "_images").glob("seed_*.png"))) == 3  # the figures of Results


class _Outputs(html.parser.HTMLParser):
    """The text of the cell outputs (``div.cell_output``) of a page built by myst-nb."""

    def __init__(self):
        super().__init__()
        self.depth, self.text = 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "div"
        elif tag == "div" and "cell_output" in (dict(attrs).get("class") or "").split():
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def test_tutorial_executed_at_build_time(site):
    """What tests/test_notebook.py would check of the tutorial run as shipped, read from
    the outputs the build computed and the site shows."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(REPO / "experiments" / "tutorial.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped bare
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    shipped: dict = {}
    exec(params.source, shipped)
    assert shipped["EPOCHS"] == 3 and shipped["WORKDIR"] == "checkpoints/tutorial"

    parser = _Outputs()
    parser.feed((site / "tutorial.html").read_text())
    text = "".join(parser.text)
    assert "codes (500, 128)" in text and "pretrained top codes (500, 64)" in text
    accuracy = float(re.search(r"^test accuracy ([0-9.]+)$", text, re.M).group(1))
    assert accuracy >= 0.7
    assert len(re.findall(r"^\{'beta': [0-9.]+\} test accuracy per seed", text, re.M)) == 2
    # run_mnist ran the tutorial's config in WORKDIR (a temporary folder's, not the
    # checkout's) and wrote its summary.json there
    assert re.search(r"^tutorial: 1000 training .* workdir \S+/checkpoints/tutorial$", text, re.M)
    saved = re.search(r"^test_accuracy ([0-9.]+) .* -> (\S+)/checkpoints/tutorial/summary.json$",
                      text, re.M)  # fmt: skip
    assert float(saved.group(1)) >= 0.7 and not saved.group(2).startswith(str(REPO))
    assert "predicted [" in text and "pretrained codes (10, 64)" in text
    assert len(re.findall(r"reconstructed from (clean|masked) digits", text)) == 2
    assert (
        not (REPO / "docs" / "checkpoints").exists()
        and not (REPO / "docs" / "my_data.npz").exists()
    )
