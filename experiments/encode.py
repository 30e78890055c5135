"""``sae-jax encode`` as a script: ``python experiments/encode.py`` takes the same flags, has
the same defaults and exit statuses, and runs the same code (``sae_jax.cli.encode``);
``--help`` lists the flags."""

import sys

from sae_jax.cli import encode

if __name__ == "__main__":
    sys.exit(encode.main())
