"""``sae-jax benchmark`` as a script: ``python experiments/benchmark.py`` takes the same flags, has
the same defaults and exit statuses, and runs the same code (``sae_jax.cli.benchmark``);
``--help`` lists the flags."""

import sys

from sae_jax.cli import benchmark

if __name__ == "__main__":
    sys.exit(benchmark.main())
