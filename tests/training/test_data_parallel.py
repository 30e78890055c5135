"""Data parallelism that moves only gradients: on 4 fake CPU devices the compiled epoch
programs have no collective on a minibatch or on indices, only the gradients' and the
metrics' all-reduce; data too large for a device is sharded, each device drawing from
its own shard; a batch size that the data axis does not divide trains on the devices
it divides over in one process, and is refused in several."""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO

from sae_jax.parallel import device_memory, epoch_order, fits_on_device, shard_layout

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

# Collects the compiled text of every epoch program that ``fit`` runs, with the shapes
# that its collectives may have: a parameter's (whole, or one model's of a sweep, or
# transposed) or a metric's (a scalar, or one per model).
PRELUDE = textwrap.dedent(r"""
    import os, re, sys
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from conftest import synthetic_config, synthetic_digits
    import sae_jax.training.loop as loop
    from sae_jax.config import LayerConfig
    from sae_jax.models import autoencoder, init_params
    from sae_jax.parallel import make_mesh
    from sae_jax.training.objectives import layer_loss
    from sae_jax.training.optim import make_optimizer

    assert jax.device_count() == 4
    programs = []  # (compiled text, allowed collective shapes)
    make_epoch = loop.make_epoch

    def recording(*args, **kwargs):
        epoch = make_epoch(*args, **kwargs)

        def run(state, *rest):
            text = epoch.lower(state, *rest).compile().as_text()
            shapes = {(), (1,), (2,)}
            for leaf in jax.tree.leaves(state.params):  # a kernel's gradient may be transposed
                for s in (leaf.shape, leaf.shape[1:], (1, *leaf.shape[1:])):
                    shapes |= {s, s[::-1], (*s[:1], *s[:0:-1])}
            programs.append((text, shapes))
            return epoch(state, *rest)

        return run

    loop.make_epoch = recording
    KIND = r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?"

    def collectives(text):
        found = []
        for shape, kind in re.findall(r"= (\([^()]*\)|\S+) " + KIND + r"\(", text):
            for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape):
                found.append((kind, dtype, tuple(int(d) for d in dims.split(",") if d)))
        return found

    def check(what, batch_sizes):
        assert programs, what
        for text, shapes in programs:
            found = collectives(text)
            assert any(kind == "all-reduce" for kind, _, _ in found), (what, "no gradient sum")
            bad = [c for c in found if c[1] != "f32" or c[2] not in shapes
                   or set(c[2]) & set(batch_sizes)]
            assert not bad, (what, sorted(set(bad)))
        print(what, "ok", sum(len(collectives(t)) for t, _ in programs), "collectives")
        programs.clear()

    layer = LayerConfig(features=16, rho=0.1, beta=1.0, noise="masking", noise_level=0.2)
    module = autoencoder(layer, 64, "uniform")

    def fit_layer(n, batch_size, **kw):
        x = synthetic_digits(n, 1)[0]
        return loop.fit(layer_loss(module, layer), init_params(module, jax.random.PRNGKey(0), 64),
                        make_optimizer(layer.optimizer), (x,), batch_size=batch_size, epochs=1,
                        key=jax.random.PRNGKey(1), mesh=make_mesh(), **kw)
""")

REPLICATED = PRELUDE + textwrap.dedent(r"""
    from sae_jax.training.pipeline import run_pipeline

    config = synthetic_config(batch_size=40).with_epochs(1)
    train, test = synthetic_digits(400, 1), synthetic_digits(100, 2)
    run_pipeline(config, train, test, mesh=make_mesh())
    check("a tiny run", (40, 10))
    fit_layer(400, 24)  # a remainder step of 16, split over the devices
    check("a remainder of 16", (24, 6, 4))
    fit_layer(402, 40)  # a remainder step of 2, computed whole on every device
    check("a remainder of 2", (40, 10))
    run_pipeline(config, train, test, seeds=[0, 1], mesh=make_mesh(models=2))
    check("a sweep of 2 models on 2 x 2 devices", (40, 20))
""")


def _run(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_epoch_programs_sum_gradients_and_move_no_batch():
    out = _run(REPLICATED)
    assert out.count(" ok ") == 4, out


SHARDED = PRELUDE + textwrap.dedent(r"""
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P
    from sae_jax.parallel import epoch_order, take_batch

    mesh = make_mesh()
    result = fit_layer(400, 24, shard_data=True)  # 16 remainder rows, 4 from each shard
    check("sharded data", (24, 6, 4))
    assert np.isfinite(result.history[0]["loss"])

    # Each device's rows of a batch come from its own shard: the values of example i
    # are i, and device s holds examples 100 s .. 100 s + 99.
    x = loop.place_data(np.arange(400, dtype=np.float32)[:, None], mesh, shard=True)
    assert x.sharding.spec == P("data"), x.sharding
    batches, rest = epoch_order(jax.random.PRNGKey(3), 400, 24, shards=4)
    take = jax.jit(lambda x, i: take_batch((x,), i, mesh, sharded=True)[0])
    for idx in [batches[0], batches[-1], rest]:
        batch = take(x, idx)
        for shard in batch.addressable_shards:
            s = shard.device.id
            values = np.asarray(shard.data)[:, 0]
            np.testing.assert_array_equal(values, 100 * s + np.asarray(idx)[s])

    # An epoch takes every example exactly once, paired with its label: with plain SGD
    # on sum(y * (x @ w)), whose gradient sum(y_i x_i) does not depend on w, one epoch
    # moves w by -lr times the sum over all the examples, however they are batched.
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(400, 3)).astype(np.float32)
    ys = rng.normal(size=(400,)).astype(np.float32)
    loss = lambda w, batch, key: (jnp.sum(batch[1] * (batch[0] @ w)), {})
    for models, data_axis, w0, data in [
        (None, None, np.zeros(3, np.float32), (xs, ys)),
        (2, 0, np.zeros((2, 3), np.float32), (np.stack([xs, -xs]), np.stack([ys, ys]))),
        (2, None, np.zeros((2, 3), np.float32), (xs, ys)),  # 2 models sharing the data
    ]:
        mesh = make_mesh(models=models) if models else make_mesh()
        key = jax.random.PRNGKey(2)
        key = key if models is None else jax.random.split(key, models)
        got = loop.fit(loss, w0, optax.sgd(0.01), data, batch_size=24, epochs=1, key=key,
                       mesh=mesh, models=models, data_axis=data_axis, shard_data=True,
                       reduction="sum")
        want = w0 - 0.01 * np.einsum("...n,...nd->...d", data[1], data[0])
        np.testing.assert_allclose(got.state.params, want, rtol=1e-5, atol=1e-5)
        check(f"sharded, models={models}, data_axis={data_axis}", (24, 12, 6, 16, 8, 4))
    print("shards drawn locally")
""")


def test_sharded_data_is_drawn_by_each_device_from_its_own_shard():
    out = _run(SHARDED)
    assert "shards drawn locally" in out, out


REFUSED = PRELUDE + textwrap.dedent(r"""
    for call, message in [
        (lambda: fit_layer(400, 30),
         "batch_size=30 does not divide over the 4 devices of the mesh's data axis"),
        (lambda: fit_layer(402, 40, shard_data=True),
         "fit: the data's 402 examples, to be sharded"),
    ]:
        try:
            call()
        except ValueError as e:
            assert str(e).startswith(message), str(e)
        else:
            raise AssertionError(message)
    print("refused")
""")


def test_fit_refuses_a_batch_that_does_not_divide_over_the_devices():
    assert "refused" in _run(REFUSED)


def test_epoch_order_permutes_each_shard_apart():
    key = jax.random.PRNGKey(0)
    perm = jax.random.permutation(key, 10)
    batches, rest = jax.jit(epoch_order, static_argnums=(1, 2, 3))(key, 10, 4, 1)
    np.testing.assert_array_equal(np.concatenate([np.ravel(batches), rest]), perm)
    batches, rest = jax.jit(epoch_order, static_argnums=(1, 2, 3))(key, 40, 12, 4)
    assert batches.shape == (3, 4, 3) and rest.shape == (4, 1)
    for s in range(4):  # shard s's rows over the epoch: a permutation of 0..9
        rows = np.concatenate([np.ravel(batches[:, s]), rest[s]])
        np.testing.assert_array_equal(np.sort(rows), np.arange(10))
    assert not np.array_equal(batches[:, 0], batches[:, 1])  # each shard its own order


@pytest.mark.parametrize("processes", [1, 2])
def test_a_batch_size_the_devices_do_not_divide_trains_on_those_it_does(monkeypatch, processes):
    """One process: as many devices as the batch (over the data axis) divides, so the
    quick start's batch of 25 runs on 1, 2, 4 and 8 devices (5 of 8). Several processes:
    every device, and a batch that does not divide is refused by the commands."""
    from sae_jax import parallel

    monkeypatch.setattr(parallel.jax, "process_count", lambda: processes)
    used = {}
    for devices in (1, 2, 4, 8):
        monkeypatch.setattr(parallel.jax, "device_count", lambda d=devices: d)
        used[devices] = [
            parallel.mesh_devices(25),
            parallel.mesh_devices(24),
            parallel.mesh_devices(25, models=2),  # models 1 x data 5 on 5 of 8
            parallel.data_axis_devices(2, 100),  # of models 2 x data 4 on 8
        ]
    if processes == 1:
        assert used == {1: [1, 1, 1, 1], 2: [1, 2, 2, 1], 4: [1, 4, 2, 2], 8: [5, 8, 5, 4]}
    else:
        assert used == {d: [d, d, d, max(d // 2, 1)] for d in (1, 2, 4, 8)}
        from sae_jax.commands.prepare import prepare
        from sae_jax.config import tiny
        from sae_jax.data import DataSpec
        from sae_jax.errors import UserError

        with pytest.raises(
            UserError,
            match=r"^--config.batch_size=25 does not divide over the "
            r"8 devices of the mesh's data axis: use a multiple",
        ):
            prepare(tiny(), "unused", DataSpec(), print, parallel.data_axis_devices(None, 25))


class _Device:
    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


class _Mesh:
    """What ``device_memory`` and ``shard_layout`` read of a mesh: its shape and the
    devices of this process."""

    def __init__(self, *limits):
        self.local_devices = [_Device(limit) for limit in limits]
        self.shape = {"data": len(limits)}


def test_data_is_sharded_only_where_it_takes_over_half_a_device():
    assert device_memory(_Mesh(None, None)) is None  # CPU: no limit, the data fits
    assert fits_on_device(10**15, _Mesh(None, None))
    assert device_memory(_Mesh(1000, 800)) == 800  # the smallest device decides
    assert fits_on_device(400, _Mesh(1000, 800)) and not fits_on_device(401, _Mesh(1000, 800))
    assert not shard_layout(400, 10, _Mesh(1000, 800), None, "fit")
    assert shard_layout(401, 10, _Mesh(1000, 800), None, "fit")
    assert shard_layout(1, 10, _Mesh(1000, 800), True, "fit")  # forced either way
    assert not shard_layout(10**6, 10, _Mesh(1000, 800), False, "fit")
    assert not shard_layout(401, 10, _Mesh(1000), None, "fit")  # one device: nothing to split
    with pytest.raises(ValueError, match="fit: the data's 11 examples, to be sharded"):
        shard_layout(401, 11, _Mesh(1000, 800), None, "fit")
