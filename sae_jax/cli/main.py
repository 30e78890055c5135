"""``sae-jax``: the command line of sae_jax, one subcommand per task.

sae-jax --help          # the subcommands
sae-jax train --help    # every flag of one, with its default
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name: (module, what it does), in the order --help lists them
SUBCOMMANDS = {
    "train": (
        "sae_jax.cli.train",
        "pretrain a stacked autoencoder layer by layer and fine-tune it (resumes; "
        "--eval_only evaluates the saved model)",
    ),
    "sweep": ("sae_jax.cli.sweep", "a grid of hyperparameters x seeds, trained in one program"),
    "search": ("sae_jax.cli.search", "choose a config on the validation split"),
    "encode": ("sae_jax.cli.encode", "write the codes of a trained stack as .npy"),
    "benchmark": (
        "sae_jax.cli.benchmark",
        "where the time of a run goes; the seed workload against PyTorch",
    ),
}


def usage(prog: str) -> str:
    """The text of ``sae-jax --help``: the subcommands, one line each."""
    from sae_jax import __version__

    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in SUBCOMMANDS.items()]
    return (
        f"usage: {prog} SUBCOMMAND [flags]\n\n"
        f"sae_jax {__version__}: autoencoders and stacked autoencoders in JAX/Flax.\n\n"
        "subcommands:\n" + "\n".join(lines) + "\n\n"
        f"'{prog} SUBCOMMAND --help' lists its flags; '{prog} --version' prints the version.\n"
    )


def main(argv: Sequence[str] | None = None, prog: str = "sae-jax") -> int:
    """Run ``prog SUBCOMMAND [flags]`` with ``argv`` (default ``sys.argv[1:]``); the exit
    status: the subcommand's, 0 for ``--help`` and ``--version``, 2 (and one line on
    stderr) for a missing or unknown subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(usage(prog))
        return 0
    if args and args[0] == "--version":
        from sae_jax import __version__

        print(f"sae-jax {__version__}")
        return 0
    names = ", ".join(SUBCOMMANDS)
    if not args:
        sys.stderr.write(f"error: name a subcommand: {names} (see {prog} --help)\n")
        return 2
    name, *rest = args
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"error: unknown subcommand {name!r}: choose from {names} (see --help)\n")
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest, prog=f"{prog} {name}")
