"""What a run leaves on disk, in its workdir; a run owns what it wrote.

Modules, in import order:

- ``restore``: orbax checkpoints read back, whole on every process; damaged ones
  moved aside.
- ``saving``: saves in a background thread, manifests once committed, SIGINT and
  SIGTERM held until the epoch is saved.
- ``metrics``: ``metrics.jsonl``, which also gives a resumed stage its history.
- ``checkpoint``: orbax checkpoints of every stage, when to save, resuming
  (``RunStore``).
- ``figures``: the PNG figures (matplotlib, imported only when drawing).
- ``summary``: ``summary.json`` and the provenance of a run, and its figures.
- ``tensorboard``: TensorBoard event files (tensorboardX).
"""
