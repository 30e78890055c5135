"""Many models in one compiled program: a grid of hyperparameter values times seeds,
trained together (vmapped), one table row per grid point; the results go to
<workdir>/sweep.json. Sweeps keep no checkpoints.

Does unsupervised pretraining help? (Erhan et al., 2010), 5 seeds with and 5
without pretraining:

  sae-jax sweep --config=seed --layers=500,500 --seeds=5 --epochs=3 \\
      --study=pretraining --data_dir=../shared/data/mnist

A sweep of the KL weight: 4 values x 3 seeds, 12 models, one table row per value:

  sae-jax sweep --config=tiny --seeds=3 --hparam=beta=0.5,1,2,3

With a validation split (--config.validation_examples), every model trains as
mnist.py trains it alone: the last N training images held out, its own best epoch
kept and its own patience; a model whose loss diverges stops alone and is reported:

  sae-jax sweep --config=tiny --config.validation_examples=200 \\
      --config.finetune_patience=2 --seeds=2 --hparam=finetune_learning_rate=1e-3,3e-3
"""

# Flags only: the sweep itself is sae_jax.commands.sweep.run_sweep.

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

from sae_jax.commands import exits
from sae_jax.commands import flags as cli
from sae_jax.config import Config


def parse_hparams(items: list[str], config: Config) -> dict[str, list[float]]:
    """``--hparam`` flags as ``{name: values}``, each value checked on ``config``, and
    each name refused if it changes nothing for every model of the grid."""
    from sae_jax.errors import UserError
    from sae_jax.training.hparams import check_models, check_used
    from sae_jax.training.sweep import grid

    hparams: dict[str, list[float]] = {}
    given: dict[str, str] = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            parsed = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--hparam={item}: expected NAME=V1,V2,...") from None
        if name in given:
            raise UserError(f"--hparam={item}: {name} is already swept by --hparam={given[name]}")
        seeds = [config.seed] * len(parsed)
        check = partial(check_models, config, seeds, {name: parsed}, used=False)
        cli.checked(f"--hparam={item}", check)
        hparams[name], given[name] = parsed, item
    models = check_models(config, *grid([config.seed], hparams)[:2], used=False)
    for name, item in given.items():
        cli.checked(f"--hparam={item}", partial(check_used, models, [name]))
    return hparams


def _parser(prog: str | None = None) -> cli.Parser:
    """The command's flags: the shared ones and its own."""
    p = cli.parser(__doc__, prog=prog)
    p.add_argument(
        "--workdir",
        default="checkpoints/sweep",
        help="folder for sweep.json (default: checkpoints/sweep)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=4,
        help="N, the number of seeds: every combination of --hparam values is trained "
        "with the seeds S, S+1, ..., S+N-1, S being --seed (default: 4)",
    )
    p.add_argument(
        "--layers", default=None, help="hidden sizes, e.g. 500,500 (default: the preset's)"
    )
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="values to try for NAME: rho, beta, l1, contractive, weight_decay or "
        "noise_level (of every pretraining layer; a noise_level of 0 is no corruption), "
        "pretrain_learning_rate, softmax_learning_rate, finetune_learning_rate, "
        "input_keep or hidden_keep (dropout). Repeat it for several names: every combination of "
        "their values is trained with every seed, and the table has one row per "
        "combination (default: none, the preset's values)",
    )
    p.add_argument(
        "--study",
        default=None,
        help="'pretraining': also train every model without pretraining (default: none)",
    )
    p.add_argument(
        "--compare_separate",
        action="store_true",
        help="also train the models one after another and report both times (default: off)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``sae-jax sweep``: parse ``argv`` (default ``sys.argv[1:]``), run; the exit status."""
    flags = _parser(prog).parse_args(argv)

    def body() -> None:
        from sae_jax.commands.sweep import run_sweep
        from sae_jax.errors import UserError

        config = cli.start(flags)
        if flags.layers:
            try:
                sizes = [int(v) for v in flags.layers.split(",")]
            except ValueError:
                raise UserError(f"--layers={flags.layers}: not a list of integers") from None
            base = config.layers[0]
            layers = tuple(dataclasses.replace(base, features=n) for n in sizes)
            flag = f"--layers={flags.layers}"
            config = cli.checked(flag, lambda: config.replace(layers=layers).validate())
        seeds = cli.seed_list(flags, config)
        run_sweep(
            config,
            flags.workdir,
            seeds=seeds,
            hparams=parse_hparams(flags.hparam, config) or None,
            study=flags.study,
            compare_separate=flags.compare_separate,
            data=cli.data_spec(flags),
            wait=flags.wait,
            log=exits.log,
        )

    return exits.run_command(body)
