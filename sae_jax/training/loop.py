"""The training engine: one ``fit`` used by every stage.

An epoch is ONE jit-compiled program: a ``lax.scan`` of the train step over a
shuffled permutation of the device-resident data, cut into minibatches, plus one
smaller step for the remainder when the batch size does not divide the data (no
example is dropped). The program is compiled once per shape and reused by every
later ``fit`` of it; metrics reach the host once per epoch, one epoch late: epoch
``e`` is looked at (metrics, NaN check, callback) while epoch ``e + 1`` runs.

The train step is ``(state, batch, key) -> (state, metrics)`` with a loss function
``loss_fn(params, batch, key) -> (loss, {name: term})``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import parallel
from sae_jax.parallel import DATA_AXIS, MODEL_AXIS, axis_size, put
from sae_jax.training.epochs import Epochs, Models
from sae_jax.training.optim import (  # noqa: F401  (make_optimizer: part of the engine's API)
    make_optimizer,
    set_learning_rate,
)

Params = Any
Batch = tuple[jax.Array, ...]
# ``(params, batch, key[, hparams]) -> (loss, terms)``: ``hparams`` is passed, by
# keyword, only where the state has some (see ``TrainState``).
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", dict[str, jax.Array]]]
EpochCallback = Callable[[int, "TrainState", dict[str, float], float], bool | None]


class TrainState(NamedTuple):
    """What one stage trains: ``step`` (int32 scalar), ``params`` and ``opt_state``.

    ``hparams`` (None, or a dict of scalars that are not trained) is passed to the
    loss as ``loss_fn(params, batch, key, hparams=...)``, so a ``vmap`` over states
    can give every model its own hyperparameters.
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    hparams: dict[str, jax.Array] | None = None


class FitResult(NamedTuple):
    """The final state and one dict of mean metrics per epoch; with ``models``, each
    model's number of epochs trained (``[models]``) and whether its loss diverged."""

    state: TrainState
    history: list[dict[str, float]]
    epochs_trained: np.ndarray | None = None
    diverged: np.ndarray | None = None


def legacy_key(key: jax.Array | np.ndarray) -> jax.Array:
    """``key`` as the legacy raw key (``uint32 [..., 2]``) that the loop splits, shards
    and checkpoints: a typed threefry2x32 key (``jax.random.key``, JAX's default) gives
    its data, the bits ``jax.random.PRNGKey`` of the same seed holds; a raw key is
    returned as it is. ``ValueError`` for a key of another implementation or shape."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = jax.random.key_data(key) if typed else key
    if raw.shape[-1:] != (2,) or raw.dtype != np.uint32:
        got = (
            f"a typed key of {jax.random.key_impl(key)}"
            if typed
            else f"{key.dtype} {list(key.shape)}"
        )
        raise ValueError(
            f"key: expected a jax.random.key (threefry2x32) or a legacy uint32 [..., 2] key "
            f"(jax.random.PRNGKey), got {got}"
        )
    return cast(jax.Array, raw)  # a host array stays one (put places it)


def init_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    hparams: dict[str, Any] | None = None,
    models: int | None = None,
    learning_rate: Any = None,
) -> TrainState:
    """A fresh ``TrainState`` for ``params``, built by one compiled program.

    With ``models=N``, ``params`` and ``hparams`` carry a leading model axis and the
    optimizer state is initialised per model. ``learning_rate`` (a scalar, or
    ``[models]``) replaces the optimizer's (see ``optim.set_learning_rate``).
    """
    return _state_program(optimizer, models is not None)(params, hparams, learning_rate)


@lru_cache(maxsize=256)  # compiled once per optimizer and structure
def _state_program(optimizer: optax.GradientTransformation, models: bool) -> Callable:
    def build(params: Params, hparams: Any, learning_rate: Any) -> TrainState:
        init = jax.vmap(optimizer.init) if models else optimizer.init
        opt_state = init(params)
        if learning_rate is not None:
            opt_state = set_learning_rate(opt_state, learning_rate)
        step = jnp.zeros(jax.tree.leaves(params)[0].shape[:1] if models else (), jnp.int32)
        return TrainState(step, params, opt_state, hparams)

    return jax.jit(build)


@lru_cache(maxsize=256)  # one step, and so one compiled epoch, per loss and optimizer
def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> StepFn:
    """The pure train step ``(state, batch, key) -> (state, metrics)``.

    ``metrics`` holds ``"loss"`` and every term that ``loss_fn`` reports.
    """

    def step(state: TrainState, batch: Batch, key: jax.Array):
        loss = loss_fn if state.hparams is None else partial(loss_fn, hparams=state.hparams)
        (loss, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, opt_state, state.hparams)
        return new_state, {"loss": loss, **terms}

    return step


@lru_cache(maxsize=256)  # a program compiled for a shape is reused by every fit of it
def make_epoch(
    step: StepFn,
    num_examples: int,
    batch_size: int,
    *,
    mesh: Mesh | None = None,
    models: bool = False,
    data_axis: int | None = None,
    reduction: str = "mean",
    sharded: bool = False,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One jitted epoch ``(state, data, key, active=None, epoch=None) -> (state, mean
    metrics)``.

    ``data`` is a tuple of arrays ``[num_examples, ...]``. The epoch's key
    (``fold_in(key, epoch)`` when ``epoch``, an int, is given) splits into a shuffle key,
    which orders the data, and a step key: step ``t`` (the state's step count) gets
    ``fold_in(step_key, t)``, so the two streams are independent. Nothing is donated:
    the state before the epoch stays valid while the epoch runs, so the host can look
    at it one epoch late (``fit``); the epoch's output buffers are new. Metrics are per
    example:
    with ``reduction="mean"`` (each step's value a mean over its batch) the mean of the
    steps' values weighted by their batch sizes; with ``"sum"`` (each a sum over its
    batch) the steps' values summed, over the number of examples.

    With a ``mesh``, every minibatch is split over the mesh's ``"data"`` axis while
    params and optimizer state stay replicated (data parallelism; XLA inserts the
    gradient all-reduce; no collective moves the batch, see ``parallel.take_batch``).
    The data is whole on every device, and the result equals one device's up to
    rounding; a remainder step that does not divide over the axis runs replicated.
    With ``sharded`` the data is split over the axis and each device draws its part
    of every batch from its own shard: another shuffle than one device's (see
    ``parallel.epoch_order``). With ``models``, the epoch is ``vmap``-ed over a
    leading model axis of ``state`` and ``key`` (and of ``data`` when
    ``data_axis=0``), which a mesh with a ``"models"`` axis spreads over that axis's
    devices; then ``active`` (bool ``[models]``, or None for all) says which models
    train: the others' states come back unchanged.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose mean or sum")
    remainder = num_examples % batch_size
    weight = (lambda size: size) if reduction == "mean" else (lambda size: 1)
    shards = axis_size(mesh, DATA_AXIS) if mesh is not None and sharded else 1

    def run_step(state: TrainState, data: Batch, idx: jax.Array, key: jax.Array):
        batch = parallel.take_batch(data, idx, mesh, sharded)
        return step(state, batch, jax.random.fold_in(key, state.step))

    def train_epoch(state: TrainState, data: Batch, key: jax.Array, active=None, epoch=None):
        if epoch is not None:
            key = jax.random.fold_in(key, epoch)
        perm_key, step_key = jax.random.split(key)
        batches, rest = parallel.epoch_order(perm_key, num_examples, batch_size, shards)
        new, metrics = jax.lax.scan(lambda s, idx: run_step(s, data, idx, step_key), state, batches)
        totals = jax.tree.map(lambda m: jnp.sum(m, axis=0) * weight(batch_size), metrics)
        if remainder:
            new, last = run_step(new, data, rest, step_key)
            totals = jax.tree.map(lambda t, m: t + m * weight(remainder), totals, last)
        if active is not None:  # a finished model keeps its state
            new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return new, jax.tree.map(lambda t: t / num_examples, totals)

    spread = models and mesh is not None and MODEL_AXIS in mesh.axis_names
    fn = train_epoch
    if models:
        axis_name = MODEL_AXIS if spread else None

        def fn(state: TrainState, data: Batch, key: jax.Array, active=None, epoch=None):
            in_axes = (0, data_axis, 0, 0, None)
            vmapped = jax.vmap(train_epoch, in_axes, spmd_axis_name=axis_name)
            return vmapped(state, data, key, active, epoch)

    out = state_sharding(mesh, models) if mesh is not None else None
    return jax.jit(fn, out_shardings=out)


def state_sharding(mesh: Mesh, models: bool = False) -> NamedSharding:
    """Where a train state lives on ``mesh``: replicated, or with ``models`` split
    over the mesh's ``"models"`` axis (every leaf has a leading model axis)."""
    spread = models and MODEL_AXIS in mesh.axis_names
    return NamedSharding(mesh, P(MODEL_AXIS) if spread else P())


def take_models(tree: Params, index: np.ndarray, mesh: Mesh | None = None) -> Params:
    """Model ``index[i]`` of every leaf of ``tree`` (leading model axis) as model
    ``i``, laid out over the mesh's ``"models"`` axis like a sweep's train state."""
    out = None if mesh is None else state_sharding(mesh, models=True)
    return jax.jit(lambda t: jax.tree.map(lambda a: a[index], t), out_shardings=out)(tree)


def place_data(
    a: jax.Array | np.ndarray, mesh: Mesh | None, models: bool = False, shard: bool | None = None
) -> jax.Array:
    """Put ``a`` ``[n, ...]`` on the device(s) (no mesh: the default device).

    With a mesh, ``a`` is whole on every device, or with ``shard`` (None: when it
    does not fit on one, ``parallel.fits_on_device``) split over the ``"data"`` axis
    where ``n`` divides. With ``models``, ``a`` is ``[models, n, ...]`` and its first
    axis is also split over the ``"models"`` axis (if any, where the count divides).
    Every process passes the whole of ``a`` and keeps its own devices' shards.
    """
    if mesh is None:
        return jax.device_put(a)  # no program runs for it (jnp.asarray may compile one)
    spec = []
    if models:
        spread = MODEL_AXIS in mesh.axis_names and a.shape[0] % axis_size(mesh, MODEL_AXIS) == 0
        spec.append(MODEL_AXIS if spread else None)
    n = a.shape[len(spec)]
    if shard is None:
        shard = not parallel.fits_on_device(parallel.device_bytes(a, mesh, models), mesh)
    spec.append(DATA_AXIS if shard and n % axis_size(mesh, DATA_AXIS) == 0 else None)
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def fit(
    loss_fn: LossFn,
    params: Params,
    optimizer: optax.GradientTransformation,
    data: Sequence[jax.Array],
    *,
    batch_size: int,
    epochs: int,
    key: jax.Array,
    name: str = "fit",
    on_epoch: EpochCallback | None = None,
    state: TrainState | None = None,
    start_epoch: int = 0,
    mesh: Mesh | None = None,
    models: int | None = None,
    data_axis: int | None = None,
    hparams: Any = None,
    reduction: str = "mean",
    evaluate: Callable[[Params], dict[str, jax.Array]] | None = None,
    shard_data: bool | None = None,
) -> FitResult:
    """Train ``params`` on ``data`` for ``epochs`` epochs of shuffled minibatches.

    Args:
      loss_fn: ``(params, batch, key) -> (scalar loss, {name: scalar term})``; the
        batch is the tuple of ``data``'s arrays gathered at ``batch_size`` indices.
        With ``hparams`` it is called as ``loss_fn(params, batch, key, hparams=...)``.
      params: the initial parameter pytree; never donated.
      optimizer: an optax transformation.
      data: arrays ``[num_examples, ...]`` with one leading size, kept on the device.
      batch_size: examples per step (the global batch, whatever the devices); a
        smaller last step takes the remainder.
      epochs: number of passes over the data (0 returns the initial state).
      key: PRNG key, typed (``jax.random.key``) or legacy (see ``legacy_key``);
        epoch ``e`` uses ``fold_in(key, e)``.
      name: the stage's name, used in error messages.
      on_epoch: called as ``on_epoch(epoch, state, metrics, seconds)`` for every
        epoch (``epoch`` counts from 0), once the next epoch is queued on the device
        (so the device never waits for it); ``state`` is that epoch's (arrays are
        never donated: keeping them is fine). Returning True stops training (the
        queued epoch is dropped); with ``models``, returning a bool array
        ``[models]`` stops the models that are False in it (their state no longer
        changes; the queued epoch runs again without them), and training ends when
        every model has stopped.
      state: resume from this state (e.g. restored from a checkpoint) instead of a
        fresh one built from ``params``; never donated.
      start_epoch: the first epoch to run; with the ``state`` saved after epoch
        ``start_epoch - 1``, the result is the same as one uninterrupted run.
      mesh: a ``Mesh`` with a ``"data"`` axis (see ``sae_jax.parallel``): data
        parallelism over its devices; ``batch_size`` must divide over that axis.
      models: train this many models at once in one compiled program: ``params``,
        ``key`` (``[models, 2]``) and every ``hparams`` leaf carry a leading model
        axis, and metrics are lists with one value per model. A model whose loss
        becomes NaN or infinite stops (as above) and the others go on.
      data_axis: with ``models``, 0 when every model has its own data
        (``[models, num_examples, ...]``), None when they share it, or a tuple with
        one of those per array of ``data``.
      hparams: a pytree of scalars (or ``[models]`` arrays) for the loss.
      reduction: ``"mean"`` or ``"sum"``: how the loss reduces a batch, so that the
        epoch's metrics are per example either way (see ``make_epoch``).
      evaluate: ``params -> {name: device array}``, called on every epoch's params
        as soon as the epoch is queued (so it runs on the device right after it);
        its values join the epoch's metrics.
      shard_data: with a mesh, split ``data`` over its ``"data"`` axis instead of
        keeping it whole on every device (see ``make_epoch``); None (default): only
        data that does not fit on one device.

    Returns:
      ``FitResult(state, history, epochs_trained, diverged)``.

    Raises:
      NonFiniteLossError: the epoch's mean loss is NaN or infinite (one model).
      ValueError: ``batch_size`` does not divide over the mesh's data axis, or data
        to shard does not divide over it.
    """
    parallel.check_batch_split(batch_size, mesh)
    key = legacy_key(key)
    data, num_examples, sharded = _placed(data, mesh, models, data_axis, name, shard_data)
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"{name}: batch_size={batch_size} must be in [1, {num_examples}]")
    step = make_train_step(loss_fn, optimizer)
    epoch_fn = make_epoch(
        step, num_examples, batch_size, mesh=mesh, models=models is not None,
        data_axis=data_axis, reduction=reduction, sharded=sharded,
    )  # fmt: skip
    if state is None:
        state = init_state(params, optimizer, hparams, models)
    if mesh is not None:
        state = put(state, state_sharding(mesh, models is not None))
        key = put(key, state_sharding(mesh, models is not None))
    where = None if mesh is None else state_sharding(mesh, models=True)
    run = Epochs(epoch_fn, data, key, where, Models(models), evaluate)
    pending = None  # the epoch dispatched last, not yet looked at
    for epoch in range(start_epoch, epochs):
        running = run.launch(state, epoch)
        if pending is not None:  # epoch - 1 is looked at while epoch runs
            if run.settle(pending, name, on_epoch):
                del running
                break
            if run.left_changed(running):  # the models left changed: again without them
                running = run.launch(pending.state, epoch)
        pending, state = running, running.state
    else:
        if pending is not None:
            run.settle(pending, name, on_epoch)
    if pending is not None:
        state = pending.state
    left = run.models
    return FitResult(state, run.history, left.epochs, left.diverged)


def _placed(
    data: Sequence[jax.Array], mesh: Mesh | None, models: int | None, data_axis: Any, name: str,
    shard: bool | None,
) -> tuple[tuple[jax.Array, ...], int, bool]:  # fmt: skip
    """``data`` on the device(s) (see ``place_data``; all of it whole on every device,
    or all of it sharded), its number of examples, and whether it is sharded."""
    axes = data_axis if isinstance(data_axis, tuple) else (data_axis,) * len(data)
    per_model = [models is not None and ax == 0 for ax in axes]
    lengths = {np.shape(a)[1 if m else 0] for a, m in zip(data, per_model, strict=True)}
    if len(lengths) != 1:
        raise ValueError(f"{name}: data arrays differ in length: {[np.shape(a) for a in data]}")
    n = lengths.pop()
    if mesh is None:
        return tuple(jax.device_put(a) for a in data), n, False
    nbytes = sum(parallel.device_bytes(a, mesh, m) for a, m in zip(data, per_model, strict=True))
    shard = parallel.shard_layout(nbytes, n, mesh, shard, name)
    placed = tuple(place_data(a, mesh, m, shard) for a, m in zip(data, per_model, strict=True))
    return placed, n, shard


def map_batches(fn: Callable[[Any], Any], xs: Any, batch_size: int) -> Any:
    """Apply ``fn`` to ``xs`` in batches of ``batch_size`` inside one ``lax.map``.

    ``xs`` is an array or a pytree of arrays ``[n, ...]`` with one leading size. It
    is zero-padded to a whole number of batches and the padding is cut from every
    output leaf, so ``fn`` must treat rows independently. Call it inside ``jax.jit``.

    Returns:
      ``fn``'s output pytree, each leaf ``[n, ...]``.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n

    def split(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(num_batches, batch_size, *a.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, xs))
    return jax.tree.map(lambda o: o.reshape(num_batches * batch_size, *o.shape[2:])[:n], out)
