"""What a run leaves on disk, in its workdir; a run owns what it wrote.

Modules, in import order:

- ``restore``: orbax checkpoints read back, whole on every process.
- ``checkpoint``: orbax checkpoints of every stage, their manifests, resuming
  (``RunStore``).
- ``figures``: the PNG figures (matplotlib, imported only when drawing).
- ``summary``: ``summary.json`` and the provenance of a run, and its figures.
- ``tensorboard``: TensorBoard event files (tensorboardX).
"""
