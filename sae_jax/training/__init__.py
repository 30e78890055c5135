"""Training: arrays and callbacks in, params and records out; nothing here opens a
file or prints.

Modules, in import order:

- ``hparams``: what may differ between the models of a sweep, as one pytree per model
  derived from the ``Config`` (``HParams``), and the names a sweep or search varies.
- ``optim``: optax optimizers from an ``OptimizerConfig`` (TF1's RMSProp, schedules,
  max-norm).
- ``epochs``: how ``fit`` walks its epochs: each looked at one epoch late, while the
  next runs, and which of its models still train.
- ``loop``: ``fit``, the one training loop: an epoch is one jitted ``lax.scan`` over
  shuffled minibatches of device-resident data.
- ``stage``: one stage on top of ``fit`` (``run_stage``): evaluation after every
  epoch, the best epoch and patience, a store to resume from.
- ``objectives``: the layer and classifier losses.
- ``evaluate``: codes of a frozen stack, a classifier's accuracy.
- ``layerwise``: greedy layer-wise pretraining of one layer and of a stack.
- ``pipeline``: ``run_pipeline``: pretraining, the softmax stage, fine-tuning, the
  test, for one model or many at once.
- ``sweep``: many models in one program (``sweep``, ``grid``, ``model_config``).
- ``search``: choosing a config on a validation split (``search``).
"""
