"""Features out: the codes of a trained stack for a split of the data, as .npy.

By default the fine-tuned stack of the run in --workdir encodes that run's own data
(MNIST, or the --data file it trained on); --pretrained takes the stack as it was
before fine-tuning (the only one of a run without labels), and --data any other file
of images of the same size.

  sae-jax encode --workdir=checkpoints/mnist --depth=1 --split=test \\
      --out=codes.npy
"""

# Flags only: the work is sae_jax.commands.saved.encode_saved.

from __future__ import annotations

from collections.abc import Sequence

from sae_jax.commands import exits
from sae_jax.commands import flags as cli


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``sae-jax encode``: parse ``argv`` (default ``sys.argv[1:]``), run; the exit status."""
    p = cli.parser(__doc__, training=False, prog=prog)
    p.add_argument(
        "--workdir",
        default="checkpoints/mnist",
        help="the run whose stack encodes (default: checkpoints/mnist)",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="the layer whose code to write, 1-based (default: the top layer)",
    )
    p.add_argument("--split", default="test", help="train or test (default: test)")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="encode with the stack as pretrained, before fine-tuning (default: the "
        "fine-tuned stack, where the run has one)",
    )
    p.add_argument(
        "--out",
        default="codes.npy",
        help="the .npy file to write: float32 [examples, features] (default: codes.npy)",
    )
    flags = p.parse_args(argv)

    def body() -> None:
        from sae_jax.commands.saved import encode_saved, write_codes

        exits.select(flags)
        codes = encode_saved(
            flags.workdir,
            split=flags.split,
            depth=flags.depth,
            pretrained=True if flags.pretrained else None,
            data=cli.data_spec(flags),
            log=exits.log,
        )
        write_codes(flags.out, codes)
        exits.log(f"codes {list(codes.shape)} -> {flags.out}")

    return exits.run_command(body)
