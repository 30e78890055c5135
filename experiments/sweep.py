"""Many models in one compiled program: seeds and hyperparameters vmapped together.

This file is intentionally kept short: it parses flags and calls
``sae_jax.experiment.run_sweep``.

Does unsupervised pretraining help? (Erhan et al., 2010), 5 seeds with and 5
without pretraining:

  python experiments/sweep.py --config=seed --layers=500,500 --seeds=5 --epochs=3 \\
      --study=pretraining --data_dir=../shared/data/mnist

A sweep of the KL weight over 4 models:

  python experiments/sweep.py --config=tiny --seeds=4 --hparam=beta=0.5,1,2,3
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from sae_jax import cli


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--workdir", default="checkpoints/sweep", help="where sweep.json goes")
    p.add_argument("--seeds", type=int, default=4, help="number of models: seeds 0..N-1")
    p.add_argument(
        "--layers", default=None, help="hidden sizes, e.g. 500,500 (default: the preset's)"
    )
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="one value per model for rho, beta, l1, contractive, weight_decay, "
        "noise_level, pretrain_learning_rate or finetune_learning_rate (repeatable)",
    )
    p.add_argument("--study", default=None, help="'pretraining': also train without it")
    p.add_argument(
        "--compare_separate",
        action="store_true",
        help="also train the models one after another and report both times",
    )
    flags = p.parse_args(argv)

    def body() -> None:
        from sae_jax.experiment import UserError, run_sweep

        config = cli.start(flags)
        if flags.seeds < 1:
            raise UserError(f"--seeds={flags.seeds}: must be >= 1")
        if flags.layers:
            try:
                sizes = [int(v) for v in flags.layers.split(",")]
            except ValueError:
                raise UserError(f"--layers={flags.layers}: not a list of integers") from None
            base = config.layers[0]
            layers = tuple(dataclasses.replace(base, features=n) for n in sizes)
            config = config.replace(layers=layers)
        hparams = {}
        for item in flags.hparam:
            name, _, values = item.partition("=")
            try:
                hparams[name] = [float(v) for v in values.split(",")]
            except ValueError:
                raise UserError(f"--hparam={item}: expected NAME=V1,V2,...") from None
            if len(hparams[name]) != flags.seeds:
                raise UserError(
                    f"--hparam={item}: {len(hparams[name])} values for --seeds={flags.seeds}"
                )
        run_sweep(
            config,
            flags.workdir,
            seeds=list(range(flags.seeds)),
            hparams=hparams or None,
            study=flags.study,
            compare_separate=flags.compare_separate,
            data=cli.data_spec(flags),
            log=cli.log,
        )

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
