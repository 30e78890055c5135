"""Device meshes, several processes (hosts), and moving arrays between them.

Data parallelism in sae_jax is plain ``jax.jit`` with shardings: a 1-D ``Mesh``
whose axis ``"data"`` splits every minibatch (and the datasets, where their size
divides) over the devices, with params and optimizer state replicated. The global
batch size stays the configured one. A sweep's mesh has a second axis,
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
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"  # the mesh axis that minibatches are split over
MODEL_AXIS = "models"  # the mesh axis that a sweep's models are spread over


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


def default_mesh(force: bool = False, models: int | None = None) -> Mesh | None:
    """A mesh over all devices when there are several (or when ``force``), else None."""
    return make_mesh(models=models) if force or jax.device_count() > 1 else None


def axis_size(mesh: Mesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh`` (1 when the mesh has no such axis)."""
    return dict(mesh.shape).get(axis, 1)


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
