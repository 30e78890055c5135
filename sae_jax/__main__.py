"""``python -m sae_jax``: the ``sae-jax`` command (see ``sae_jax.cli.main``)."""

import sys

from sae_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sae_jax"))
