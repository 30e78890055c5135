"""Sphinx configuration of the sae_jax documentation.

Build from the repository root: ``sphinx-build -W -b html docs docs/_build/html``.
Nothing here reaches the network.
"""

import contextlib
import io
import os
import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[1]
# The sae_jax of this checkout, installed or not: for autodoc here, and for the
# kernel that executes the tutorial (it inherits PYTHONPATH).
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

os.environ.setdefault("COLUMNS", "88")  # the width of the commands' --help text

import sae_jax  # noqa: E402

project = "sae_jax"
author = "the sae_jax authors"
copyright = "the sae_jax authors"
version = release = sae_jax.__version__

extensions = [
    "myst_nb",  # MyST markdown (myst_parser) and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Args:, Returns:, Raises: sections
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "**.ipynb_checkpoints"]

# MyST: `page.md#heading` links between pages. HTML comments (the guides' runnable
# markers) stay out of the output.
myst_heading_anchors = 4

# autodoc: signatures as written, members in source order, Google-style docstrings.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_type_aliases = {"ArrayLike": "ArrayLike"}  # as written, not its expansion
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The tutorial notebook ships without outputs: it is executed at every build, in a
# temporary folder (its relative WORKDIR and files land there, not in the checkout),
# and a failing cell fails the build. `-D nb_execution_mode=off` skips it.
nb_execution_mode = "force"
nb_execution_in_temp = True
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = f"sae_jax {release}"
html_theme_options = {"show_toc_level": 2}


def _skip_member(app, what, name, obj, skip, options):
    """Leave out what the classes inherit rather than say: a NamedTuple's fields
    ("Alias for field number N") and an undocumented ``setup`` of a Flax module
    (which would show Flax's own docstring)."""
    doc = getattr(obj, "__doc__", None)
    if (doc or "").startswith("Alias for field number") or (name == "setup" and not doc):
        return True
    return skip


def _signature(app, what, name, obj, options, signature, return_annotation):
    """A Flax module's signature without the ``parent`` and ``name`` every module takes."""
    if what == "class" and signature:
        signature = re.sub(r", parent: [^,]*, name: str \| None = None\)$", ")", signature)
    return signature, return_annotation


class CommandHelp(SphinxDirective):
    """``{command-help} train``: what ``sae-jax train --help`` prints, as a literal
    block (no argument: ``sae-jax --help``), so the page cannot drift from the flags."""

    optional_arguments = 1

    def run(self):
        from sae_jax.cli.main import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*self.arguments, "--help"])
        text = out.getvalue()
        return [nodes.literal_block(text, text, language="text")]


def setup(app):
    app.add_directive("command-help", CommandHelp)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _signature)
