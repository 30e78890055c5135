"""The commands: the only layer that prints and sets exit statuses.

Modules, in import order:

- ``exits``: how a command runs and ends (one line and an exit status), the platform
  and several processes, ``log``.
- ``flags``: the flags every command shares, and the checked ``Config`` they give.
- ``prepare``: the platform's compilation cache, the data, the workdir and its lock.
- ``progress``: progress lines and bars.
- ``train``: ``run_mnist``, the train command.
- ``saved``: a finished run: its test accuracy, its codes of a dataset.
- ``sweep``: a grid of models, one table row per grid point (``sweep.json``).
- ``search``: a search, ``search.json`` and ``search.md``.

``sae_jax.cli`` (``sae-jax``, and the scripts of ``experiments/``) parses flags and
calls these.
"""
