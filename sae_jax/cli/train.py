"""Stacked autoencoders on MNIST: greedy layer-wise pretraining of autoencoders, then
fine-tuning of the stack with a softmax head.

Checkpoints are saved in --workdir (an epoch a minute, the end of every stage, and
the epoch in progress on Ctrl-C or SIGTERM): run the same command again and it
resumes where it stopped. The results go to <workdir>/summary.json.

  sae-jax train --config=tiny      # seconds, on the bundled sample
  sae-jax train --platform=cpu --config=seed \\
      --data_dir=../shared/data/mnist --workdir=checkpoints/seed
  sae-jax train --config=tiny --config.layers.0.beta=1 \\
      --data=my_data.npz --workdir=checkpoints/own   # any field, your own data
  sae-jax train --eval_only        # the test accuracy of the model in checkpoints/mnist
"""

# Flags only: the experiment itself is sae_jax.commands.train.run_mnist.

from __future__ import annotations

from collections.abc import Sequence

from sae_jax.commands import exits
from sae_jax.commands import flags as cli


def parser(prog: str | None = None) -> cli.Parser:
    """The flags of ``sae-jax train``: the shared ones and its own."""
    p = cli.parser(__doc__, prog=prog)
    p.add_argument(
        "--workdir",
        default="checkpoints/mnist",
        help="folder for checkpoints, metrics, figures and summary.json "
        "(default: checkpoints/mnist)",
    )
    cli.checkpoint_flags(p)  # --restart, --checkpoint_every
    p.add_argument(
        "--eval_only",
        action="store_true",
        help="only print the test accuracy of the model saved in --workdir (default: train)",
    )
    p.add_argument(
        "--no_figures", action="store_true", help="skip the PNG figures (default: draw them)"
    )
    p.add_argument(
        "--no_pretraining",
        action="store_true",
        help="baseline: fine-tune the same stack from its random initialisation "
        "(default: pretrain)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write every epoch's metrics, the hparams and the figures to "
        "<workdir>/tensorboard/ (needs the tensorboard extra; default: off)",
    )
    p.add_argument(
        "--data_parallel",
        action="store_true",
        help="split every minibatch over all devices, even one (default: only when there "
        "are several)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``sae-jax train``: parse ``argv`` (default ``sys.argv[1:]``), train; the exit
    status."""
    flags = parser(prog).parse_args(argv)

    def body() -> None:
        from sae_jax.commands.saved import evaluate_saved
        from sae_jax.commands.train import run_mnist

        config = cli.start(flags)
        if flags.eval_only:
            evaluate_saved(flags.workdir, data=cli.data_spec(flags), log=exits.log)
            return
        run_mnist(
            config,
            flags.workdir,
            data=cli.data_spec(flags),
            restart=flags.restart,
            figures=not flags.no_figures,
            data_parallel=flags.data_parallel,
            pretrain=not flags.no_pretraining,
            wait=flags.wait,
            log=exits.log,
            progress_stream=exits.progress_stream(),
            tensorboard=flags.tensorboard,
            checkpoint_every=flags.checkpoint_every,
        )

    return exits.run_command(body)
