"""Stacked autoencoders on MNIST.

This file is intentionally kept short: it parses flags and calls
``sae_jax.experiment.run_mnist``.

  python experiments/mnist.py --platform=cpu --config=seed --data_dir=../shared/data/mnist
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="cpu", help="cpu, gpu or tpu (default cpu)")
    p.add_argument("--config", default="seed", help="preset name: seed or tiny (default seed)")
    p.add_argument(
        "--data_source",
        default="auto",
        help="auto, idx, download, tfds or sample (default auto: --data_dir if it holds the "
        "files, the bundled sample if the preset fits in it, the cache, a prepared "
        "tensorflow-datasets copy, then a download)",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with the four MNIST IDX files, .gz or raw (for tfds: its data folder)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="download cache root (default $SAE_JAX_CACHE_DIR, else ~/.cache/sae_jax)",
    )
    p.add_argument(
        "--mirror",
        default=None,
        help="base URL to download from (default $SAE_JAX_MNIST_MIRROR, else the "
        "tensorflow-datasets mirror)",
    )
    p.add_argument(
        "--no_verify",
        action="store_true",
        help="skip the canonical sha256 check, for your own data in IDX format",
    )
    p.add_argument("--workdir", default="checkpoints/mnist", help="where summary.json goes")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override every stage's epochs (a stage the preset skips stays skipped)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the run saved in --workdir and start over (default: resume it)",
    )
    p.add_argument(
        "--eval_only",
        action="store_true",
        help="only print the test accuracy of the model saved in --workdir",
    )
    p.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(argv)
    from sae_jax.checkpoint import CheckpointError
    from sae_jax.config import ConfigError, get_preset
    from sae_jax.data import DataError
    from sae_jax.engine import NonFiniteLossError
    from sae_jax.experiment import UserError, evaluate_saved, run_mnist, select_platform

    log = lambda s: print(s, flush=True)
    data = {
        "data_source": flags.data_source,
        "data_dir": flags.data_dir,
        "cache_dir": flags.cache_dir,
        "mirror": flags.mirror,
        "verify": not flags.no_verify,
    }
    try:
        select_platform(flags.platform)
        if flags.eval_only:
            evaluate_saved(flags.workdir, **data, log=log)
            return 0
        config = get_preset(flags.config)
        if flags.seed is not None:
            config = config.replace(seed=flags.seed)
        if flags.epochs is not None:
            if flags.epochs < 0:
                raise UserError(f"--epochs={flags.epochs}: must be >= 0")
            config = config.with_epochs(flags.epochs)
        run_mnist(
            config,
            flags.workdir,
            **data,
            restart=flags.restart,
            figures=not flags.no_figures,
            log=log,
            progress_stream=sys.stdout if sys.stdout.isatty() else None,
        )
    except (ConfigError, DataError, UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
