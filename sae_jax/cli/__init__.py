"""The command line: ``sae-jax`` (and ``python -m sae_jax``), one subcommand a module.
Each module parses its flags and calls ``sae_jax.commands``; none imports jax before
its flags are read and the platform is chosen.

Modules:

- ``main``: ``sae-jax SUBCOMMAND [flags]``, the subcommands and ``--help``.
- ``train``: ``sae-jax train``, the MNIST experiment (``--eval_only`` evaluates).
- ``sweep``: ``sae-jax sweep``, a grid of models x seeds trained together.
- ``search``: ``sae-jax search``, a config chosen on the validation split.
- ``encode``: ``sae-jax encode``, a trained stack's codes as ``.npy``.
- ``benchmark``: ``sae-jax benchmark``, where a run's time goes, and against PyTorch;
  with ``benchmark_overhead`` (recording a run), ``benchmark_report`` (its tables) and
  ``benchmark_torch`` (the PyTorch side, with the ``bench`` extra).

``experiments/mnist.py``, ``sweep.py``, ``search.py``, ``encode.py`` and
``benchmark.py`` are the same commands as scripts.
"""
