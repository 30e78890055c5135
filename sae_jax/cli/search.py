"""Choose a config on the validation split: a grid (or N random points) of a search
space times seeds, trained as vmapped models grouped by shape. Every model keeps its
own best fine-tuning epoch and stops on its own patience; points are ranked by mean
validation accuracy; the test set is evaluated once, for the chosen point. The
results go to <workdir>/search.json and <workdir>/search.md. Searches keep no
checkpoints.

A grid over the fine-tuning rate and the dropout keep rate of hidden units, 2 seeds:

  sae-jax search --config=tiny --config.validation_examples=200 \\
      --space=finetune_learning_rate=1e-3,3e-3 --space=hidden_keep=0.5,1 --seeds=2

Eight random points of the published SdA protocol, with its no-pretraining baseline:

  sae-jax search --config=sda3 --points=8 --study=pretraining \\
      --space=noise_level=0,0.1,0.25,0.4 --space=pretrain_learning_rate=log:1e-4:1e-2 \\
      --space=finetune_learning_rate=log:1e-4:3e-3 --space=features=1000,2000 \\
      --data_dir=../shared/data/mnist --workdir=checkpoints/search_sda3
"""

# Flags only: the search itself is sae_jax.commands.search.run_search.

from __future__ import annotations

from collections.abc import Sequence

from sae_jax.commands import exits
from sae_jax.commands import flags as cli


def _parser(prog: str | None = None) -> cli.Parser:
    """The command's flags: the shared ones and its own."""
    p = cli.parser(__doc__, prog=prog)
    p.add_argument(
        "--workdir",
        default="checkpoints/search",
        help="folder for search.json and search.md (default: checkpoints/search)",
    )
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="NAME=VALUES",
        help="a searched name and its values: NAME=V1,V2,... (a list), NAME=LOW:HIGH "
        "(uniform) or NAME=log:LOW:HIGH (log-uniform; ranges need --points). Names: "
        "the loss terms rho, beta, l1, contractive, weight_decay, noise_level (of every "
        "pretraining layer; a noise_level of 0 is no corruption), pretrain_learning_rate, "
        "softmax_learning_rate, finetune_learning_rate, input_keep, hidden_keep (dropout), "
        "features (every layer's width), pretrain_epochs. Repeat it for several names",
    )
    p.add_argument(
        "--points",
        type=int,
        default=None,
        help="N random points of the space (default: the grid of its lists)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="N: every point is trained with the seeds S, ..., S+N-1, S being --seed (default: 1)",
    )
    p.add_argument(
        "--sample_seed", type=int, default=0, help="seed of the random points (default: 0)"
    )
    p.add_argument(
        "--study",
        default=None,
        help="'pretraining': also search without pretraining, the same number of points "
        "over the fine-tuning names, as the baseline (default: none)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``sae-jax search``: parse ``argv`` (default ``sys.argv[1:]``), run; the exit status."""
    flags = _parser(prog).parse_args(argv)

    def body() -> None:
        from sae_jax.commands.search import parse_space, run_search
        from sae_jax.errors import UserError

        config = cli.start(flags)
        if flags.points is not None and flags.points < 1:
            raise UserError(f"--points={flags.points}: must be >= 1")
        if not flags.space:
            raise UserError("--space: name at least one thing to search, e.g. --space=beta=1,3")
        space = parse_space(flags.space)
        seeds = cli.seed_list(flags, config)
        run_search(
            config,
            flags.workdir,
            space=space,
            seeds=seeds,
            points=flags.points,
            sample_seed=flags.sample_seed,
            study=flags.study,
            data=cli.data_spec(flags),
            wait=flags.wait,
            log=exits.log,
        )

    return exits.run_command(body)
