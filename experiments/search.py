"""``sae-jax search`` as a script: ``python experiments/search.py`` takes the same flags, has
the same defaults and exit statuses, and runs the same code (``sae_jax.cli.search``);
``--help`` lists the flags."""

import sys

from sae_jax.cli import search

if __name__ == "__main__":
    sys.exit(search.main())
