"""``sae-jax train`` as a script: ``python experiments/mnist.py`` takes the same flags, has
the same defaults and exit statuses, and runs the same code (``sae_jax.cli.train``);
``--help`` lists the flags."""

import sys

from sae_jax.cli import train

if __name__ == "__main__":
    sys.exit(train.main())
