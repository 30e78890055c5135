"""Device meshes for data parallelism, and multi-host start-up.

Data parallelism in sae_jax is plain ``jax.jit`` with shardings: a 1-D ``Mesh``
whose axis ``"data"`` splits every minibatch (and the datasets, where their size
divides) over the devices, with params and optimizer state replicated. The global
batch size stays the configured one.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from sae_jax.engine import DATA_AXIS


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all of them).

    On several hosts (after ``initialize_distributed``) ``jax.devices()`` lists every
    host's devices, so the mesh spans them all.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} are present")
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def default_mesh(force: bool = False) -> Mesh | None:
    """A mesh over all devices when there are several (or when ``force``), else None."""
    return make_mesh() if force or jax.device_count() > 1 else None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-host run through ``jax.distributed.initialize``.

    On Cloud TPU pods and on SLURM or Open MPI clusters JAX detects all three
    arguments itself; elsewhere pass them (the coordinator may also come from
    ``JAX_COORDINATOR_ADDRESS``). Every host runs the same command; call this
    before anything else touches JAX.
    """
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
