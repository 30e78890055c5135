"""``sae-jax sweep`` as a script: ``python experiments/sweep.py`` takes the same flags, has
the same defaults and exit statuses, and runs the same code (``sae_jax.cli.sweep``);
``--help`` lists the flags."""

import sys

from sae_jax.cli import sweep

if __name__ == "__main__":
    sys.exit(sweep.main())
