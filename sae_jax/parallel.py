"""Device meshes, several processes (hosts), and moving arrays between them.

Data parallelism in sae_jax is plain ``jax.jit`` with shardings: a 1-D ``Mesh``
whose axis ``"data"`` splits every minibatch over the devices, with params and
optimizer state replicated. The global batch size stays the configured one, and
must divide over the data axis (``check_batch_split``). A dataset that fits in a
device's memory (``fits_on_device``) is kept whole on every device, so each device
gathers its part of a minibatch locally and a step's only collectives are the
gradients' and the metrics' all-reduce; a larger one is split over the data axis,
each device drawing its part of every minibatch from its own shard
(``epoch_order``, ``take_batch``). A sweep's mesh has a second axis,
``"models"``, over which the models are spread: each device trains its share of
them, and the models never communicate.

With several processes (``initialize_distributed``) a mesh spans every process's
devices; arrays on it are global ``jax.Array`` s, of which each process holds its
own shards. ``replicated`` and ``to_host`` cross between host values and global
arrays; ``is_primary`` says which process writes files and prints.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import ConfigError

DATA_AXIS = "data"  # the mesh axis that minibatches are split over
MODEL_AXIS = "models"  # the mesh axis that a sweep's models are spread over
# A dataset is kept whole on every device when it takes at most this share of the
# device's memory (the rest is left for the other splits, params and activations).
REPLICATE_FRACTION = 0.5


def make_mesh(num_devices: int | None = None, models: int | None = None) -> Mesh:
    """A mesh over the first ``num_devices`` devices (default: all of them).

    Without ``models`` it is 1-D, ``("data",)``. With ``models`` (a sweep of that
    many models) it is 2-D, ``("models", "data")``: the models axis gets the
    largest size that divides both the model count and the devices, the data axis
    the rest (32 models on 8 devices: 8 x 1; 2 models on 4 devices: 2 x 2).

    After ``initialize_distributed`` ``jax.devices()`` lists every process's
    devices, so the mesh spans them all.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} are present")
    if models is None:
        return Mesh(np.array(devices[:n]), (DATA_AXIS,))
    m = math.gcd(models, n)
    return Mesh(np.array(devices[:n]).reshape(m, n // m), (MODEL_AXIS, DATA_AXIS))


def mesh_devices(batch_size: int | None = None, models: int | None = None) -> int:
    """How many devices ``default_mesh`` spans: all of them; in a run of one process, the
    most whose data axis (see ``make_mesh``) ``batch_size`` divides over (a batch of
    25 on 8 devices: 5, on 4: 1). A run of several processes spans all its devices,
    and a batch that does not divide is refused (``check_batch_split``)."""
    n = jax.device_count()
    if batch_size is None or jax.process_count() > 1:
        return n
    return next(k for k in range(n, 0, -1) if batch_size % _data_size(k, models) == 0)


def _data_size(devices: int, models: int | None) -> int:
    """The size of the data axis of ``make_mesh(devices, models)``."""
    return devices if models is None else devices // math.gcd(models, devices)


def default_mesh(
    force: bool = False, models: int | None = None, batch_size: int | None = None
) -> Mesh | None:
    """A mesh over ``mesh_devices(batch_size, models)`` devices when that is several
    (or when ``force``), else None."""
    devices = mesh_devices(batch_size, models)
    return make_mesh(devices, models=models) if force or devices > 1 else None


def unused_devices_line(batch_size: int, mesh: Mesh | None) -> str | None:
    """What ``default_mesh`` left out for ``batch_size``, in words (None: nothing)."""
    used, n = 1 if mesh is None else mesh.size, jax.device_count()
    if used == n:
        return None
    return (
        f"batch_size={batch_size} does not divide over the {n} devices: training on {used} "
        f"of them (a batch size that {n} divides uses them all)"
    )


def axis_size(mesh: Mesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh`` (1 when the mesh has no such axis)."""
    return dict(mesh.shape).get(axis, 1)


def data_axis_devices(models: int | None = None, batch_size: int | None = None) -> int:
    """The size of the ``"data"`` axis of ``default_mesh(models=models,
    batch_size=batch_size)`` (1 with one device), known before any mesh is built."""
    return _data_size(mesh_devices(batch_size, models), models)


def check_batch_split(batch_size: int, mesh: Mesh | None) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) when ``batch_size`` does not divide
    over the mesh's ``"data"`` axis (no mesh: nothing to check)."""
    devices = 1 if mesh is None else axis_size(mesh, DATA_AXIS)
    if batch_size % devices:
        raise ConfigError(
            f"batch_size={batch_size} does not divide over the {devices} devices of the "
            f"mesh's data axis"
        )


def device_memory(mesh: Mesh) -> int | None:
    """The smallest ``bytes_limit`` among this process's devices of ``mesh``, None
    where no device reports one (CPU)."""
    limits = []
    for device in mesh.local_devices:
        try:
            stats = device.memory_stats()
        except Exception:  # a backend without memory statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def fits_on_device(nbytes: int, mesh: Mesh) -> bool:
    """Whether ``nbytes`` of data, kept whole on every device of ``mesh``, take at most
    ``REPLICATE_FRACTION`` of a device's memory (True where the memory is unknown).
    Process 0 decides for every process."""
    limit = device_memory(mesh)
    return bool(broadcast_int(limit is None or nbytes <= REPLICATE_FRACTION * limit))


def epoch_order(
    key: jax.Array, num_examples: int, batch_size: int, shards: int = 1
) -> tuple[jax.Array, jax.Array]:
    """The examples an epoch's minibatches take, as ``(batches, rest)`` indices.

    ``shards=1``: one permutation of all the examples, ``batches``
    ``[num_examples // batch_size, batch_size]`` and the remainder ``rest``
    ``[num_examples % batch_size]``. Otherwise the data is split into ``shards``
    equal shards of ``m = num_examples // shards`` rows (``shards`` must divide
    both sizes) and each shard has its own permutation: ``batches``
    ``[num_examples // batch_size, shards, batch_size // shards]`` and ``rest``
    ``[shards, remainder // shards]`` are rows of each shard, 0 to ``m - 1``, so
    every example is still taken once per epoch (see ``take_batch``).
    """
    full = num_examples // batch_size
    if shards == 1:
        perm = jax.random.permutation(key, num_examples)
        return perm[: full * batch_size].reshape(full, batch_size), perm[full * batch_size :]
    m, part = num_examples // shards, batch_size // shards
    perms = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(key, shards))
    batches = perms[:, : full * part].reshape(shards, full, part).transpose(1, 0, 2)
    return batches, perms[:, full * part :]


def take_batch(
    data: tuple[jax.Array, ...], idx: jax.Array, mesh: Mesh | None, sharded: bool = False
) -> tuple[jax.Array, ...]:
    """The minibatch of ``data`` (arrays ``[n, ...]``) at ``idx``, inside ``jax.jit``.

    ``idx`` is one of ``epoch_order``'s. Without ``sharded`` (``idx`` ``[b]``) the
    data is whole on every device: each device gathers its ``b / devices`` rows of
    the batch, split over the mesh's ``"data"`` axis, locally; where ``b`` does not
    divide over the axis (a remainder step) every device gathers the whole batch
    and computes the step alike. With ``sharded`` (``idx`` ``[shards, part]``, data
    split over the axis) each device takes its ``part`` rows from its own shard.
    Either way no collective moves the batch. Returns arrays ``[b, ...]``.
    """
    if mesh is None:
        return tuple(jnp.take(a, idx, axis=0) for a in data)
    split = NamedSharding(mesh, P(DATA_AXIS))
    constrain = jax.lax.with_sharding_constraint
    if not sharded:
        if len(idx) % axis_size(mesh, DATA_AXIS):
            return tuple(jnp.take(a, idx, axis=0) for a in data)
        # Whole, then split: each device slices its part of the indices, and the
        # split does not spread back into the epoch's permutation.
        idx = constrain(constrain(idx, NamedSharding(mesh, P())), split)
        return tuple(constrain(jnp.take(a, idx, axis=0), split) for a in data)
    shards, part = idx.shape
    idx = constrain(idx, split)

    def local(a: jax.Array) -> jax.Array:
        a = constrain(a.reshape(shards, -1, *a.shape[1:]), split)
        rows = jax.vmap(lambda shard, i: jnp.take(shard, i, axis=0))(a, idx)
        return constrain(rows.reshape(shards * part, *a.shape[2:]), split)

    return tuple(local(a) for a in data)


def device_bytes(a: Any, mesh: Mesh, models: bool = False) -> int:
    """The bytes of ``a`` that each device holds when ``a`` is whole on every device of
    the mesh's data axis (with ``models``, ``a`` ``[models, ...]``: its share of them)."""
    spread = axis_size(mesh, MODEL_AXIS) if models else 1
    return int(np.prod(np.shape(a), dtype=np.int64)) * np.dtype(a.dtype).itemsize // spread


def shard_layout(nbytes: int, num_examples: int, mesh: Mesh, shard: bool | None, name: str) -> bool:
    """Whether a fit's data (``nbytes`` per device when whole on every device) is split
    over the mesh's data axis: ``shard``, or (None) when it does not fit on a device.
    Raises ``ValueError`` when data to shard does not divide over the axis."""
    devices = axis_size(mesh, DATA_AXIS)
    if shard is None:
        shard = not fits_on_device(nbytes, mesh)
    if shard and num_examples % devices:
        raise ValueError(
            f"{name}: the data's {num_examples} examples, to be sharded ({nbytes} bytes per "
            f"device whole), do not divide over the {devices} devices of the mesh's data axis"
        )
    return bool(shard and devices > 1)


def layout_line(nbytes: int, mesh: Mesh) -> str:
    """Where data parallelism over ``mesh`` keeps training data of ``nbytes``, in words."""
    devices, mib = axis_size(mesh, DATA_AXIS), nbytes / 2**20
    over = f"data parallel over {devices} device{'s' if devices > 1 else ''}"
    if fits_on_device(nbytes, mesh):
        return (
            f"{over}: the training data ({mib:.1f} MiB) is whole on every device, each "
            f"gathering its rows of a batch locally"
        )
    memory = device_memory(mesh)  # None where this process's devices report none
    size = "" if memory is None else f" ({memory / 2**20:.0f} MiB)"
    return (
        f"{over}: the training data ({mib:.1f} MiB) does not fit on one device"
        f"{size}, so it is split over them, each drawing "
        f"its rows of a batch from its own shard"
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 100,
) -> None:
    """Join a multi-process run through ``jax.distributed.initialize``.

    On Cloud TPU pods and on SLURM or Open MPI clusters JAX detects the first three
    arguments itself; elsewhere pass them (the coordinator may also come from
    ``JAX_COORDINATOR_ADDRESS``). Every process runs the same command; call this
    before anything else touches JAX. On CPU the processes' collectives go through
    gloo. ``timeout_s`` bounds both the wait for the other processes at the start
    and how long a process that stopped answering (heartbeats) is waited for
    before every other process is stopped.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=timeout_s,
    )


def is_primary() -> bool:
    """True in the process that writes files and prints (process 0; the only one
    without ``initialize_distributed``)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
    """Process 0's ``value``, in every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def everywhere() -> jax.sharding.Sharding:
    """A whole array on every device of every process (one process: its first device)."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(Mesh(np.array(jax.devices()), (DATA_AXIS,)), P())


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``jax.device_put(tree, sharding)``; with several processes, every array of this
    process only (every process passing the same values) is cut into the shards this
    process holds (``jax.make_array_from_callback``), which makes global arrays that
    orbax can save (``device_put`` does not, when nothing has computed on them)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(one, tree)


def replicated(tree: Any) -> Any:
    """``tree`` with every array that lives in this process only (a key made with
    ``jax.random``, a host value) made a global array replicated on every device of
    every process; a no-op in one process. Every process must pass the same values.
    """
    if jax.process_count() == 1:
        return tree
    local = lambda a: not (isinstance(a, jax.Array) and not a.is_fully_addressable)
    return jax.tree.map(lambda a: put(a, everywhere()) if local(a) else a, tree)


def to_host(tree: Any) -> Any:
    """``tree``'s arrays as numpy arrays holding their whole value, also for global
    arrays whose shards live in other processes (gathered; every process must call
    it then)."""

    def one(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(jax.device_get(a))

    return jax.tree.map(one, tree)
