"""sae_jax.losses against numpy formulas written here and against finite differences."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

from sae_jax import losses

RNG = np.random.default_rng(0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_squared_error(r, t):
    return ((r - t) ** 2).sum(-1)


def _np_bernoulli_ce(z, t):
    p = _sigmoid(z)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(-1)


def _np_kl_sparsity(a, rho):
    rh = a.mean(0)
    return (rho * np.log(rho / rh) + (1 - rho) * np.log((1 - rho) / (1 - rh))).sum()


def _np_l1(a):
    return np.abs(a).sum(-1)


def _np_contractive(x, w, b):
    """||J||_F^2 from the Jacobian built explicitly, one example at a time."""
    out = []
    for xi in x:
        h = _sigmoid(xi @ w + b)
        jac = (h * (1 - h))[:, None] * w.T  # [units, in]
        out.append((jac**2).sum())
    return np.array(out)


def _np_softmax_ce(z, y):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _unit(shape):
    return RNG.uniform(0.05, 0.95, size=shape)


# (name, jax function of float arrays, numpy reference, example inputs)
CASES = {
    "squared_error": (
        losses.squared_error,
        _np_squared_error,
        (RNG.normal(size=(6, 5)), _unit((6, 5))),
    ),
    "bernoulli_cross_entropy": (
        losses.bernoulli_cross_entropy,
        _np_bernoulli_ce,
        (RNG.normal(size=(6, 5)) * 3, _unit((6, 5))),
    ),
    "kl_sparsity": (  # rho 0.27: neither the config default 0.05 nor the presets' 0.1
        lambda a: losses.kl_sparsity(a, 0.27),
        lambda a: _np_kl_sparsity(a, 0.27),
        (_unit((6, 5)),),
    ),
    "l1_activity": (losses.l1_activity, _np_l1, (RNG.normal(size=(6, 5)) + 0.1,)),
    "contractive_penalty": (
        lambda x, w, b: losses.contractive_penalty(jax.nn.sigmoid(x @ w + b), w),
        _np_contractive,
        (RNG.normal(size=(4, 3)), RNG.normal(size=(3, 5)), RNG.normal(size=(5,))),
    ),
    "softmax_cross_entropy": (
        lambda z: losses.softmax_cross_entropy(z, jnp.array([0, 3, 1, 2, 3, 0])),
        lambda z: _np_softmax_ce(z, np.array([0, 3, 1, 2, 3, 0])),
        (RNG.normal(size=(6, 4)) * 2,),
    ),
}


def test_per_example_losses_keep_every_leading_axis():
    # [..., features] -> [...]: a [2, 3, features] batch gives the [6, features] values.
    a, b, z = RNG.normal(size=(2, 3, 5)), _unit((2, 3, 5)), RNG.normal(size=(2, 3, 4)) * 2
    y = np.array([[0, 3, 1], [2, 3, 0]])
    flat = lambda v: v.reshape(6, -1)
    cases = [
        (losses.squared_error, (a, b), _np_squared_error(flat(a), flat(b))),
        (losses.bernoulli_cross_entropy, (3 * a, b), _np_bernoulli_ce(flat(3 * a), flat(b))),
        (losses.l1_activity, (a,), _np_l1(flat(a))),
        (losses.softmax_cross_entropy, (z, y), _np_softmax_ce(flat(z), y.reshape(6))),
    ]
    x, w, bias = RNG.normal(size=(2, 2, 3)), RNG.normal(size=(3, 5)), RNG.normal(size=(5,))
    h = jax.nn.sigmoid(jnp.asarray(x) @ w + bias)
    cases.append((losses.contractive_penalty, (h, w), _np_contractive(x.reshape(4, 3), w, bias)))
    for fn, args, expected in cases:
        got = jax.jit(fn)(*args)
        np.testing.assert_allclose(got, expected.reshape(args[0].shape[:-1]), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_under_jit(name):
    fn, ref, args = CASES[name]
    got = jax.jit(fn)(*[jnp.asarray(a, jnp.float32) for a in args])
    np.testing.assert_allclose(got, ref(*args), rtol=2e-5, atol=1e-5)


def _finite_difference(ref, args, argnum, eps=1e-6):
    """Central differences of the numpy reference's sum(ref(*args)) in args[argnum]."""
    x = np.array(args[argnum], dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        f_hi = np.sum(ref(*args[:argnum], hi, *args[argnum + 1 :]))
        f_lo = np.sum(ref(*args[:argnum], lo, *args[argnum + 1 :]))
        grad[i] = (f_hi - f_lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_finite_differences_of_numpy_reference(name):
    fn, ref, args = CASES[name]
    args64 = [np.asarray(a, np.float64) for a in args]
    with jax.enable_x64(True):
        for argnum in range(len(args)):
            auto = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=argnum))(*args64)
            numeric = _finite_difference(ref, args64, argnum)
            np.testing.assert_allclose(auto, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_matches_numpy_per_model(name):
    fn, ref, args = CASES[name]
    scales = (1.0, 0.5, 0.9)
    stacked = [jnp.stack([jnp.asarray(a, jnp.float32) * s for s in scales]) for a in args]
    batched = jax.jit(jax.vmap(fn))(*stacked)
    expected = np.stack([ref(*[np.asarray(a) * s for a in args]) for s in scales])
    np.testing.assert_allclose(batched, expected, rtol=2e-5, atol=1e-5)


def test_contractive_matches_autodiff_jacobian():
    x, w, b = (jnp.asarray(a, jnp.float32) for a in CASES["contractive_penalty"][2])
    encode = lambda xi: jax.nn.sigmoid(xi @ w + b)
    jac = jax.vmap(jax.jacfwd(encode))(x)  # [batch, units, in]
    expected = jnp.sum(jac**2, axis=(1, 2))
    got = losses.contractive_penalty(encode(x), w)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bernoulli_cross_entropy_is_stable_for_large_logits():
    z = jnp.array([[100.0, -100.0, 0.0]])
    t = jnp.array([[0.0, 1.0, 0.5]])
    got = jax.jit(losses.bernoulli_cross_entropy)(z, t)
    # -log(1 - sigmoid(100)) = 100 + log1p(e^-100); -log(sigmoid(-100)) likewise; ln 2 at 0.
    np.testing.assert_allclose(got, [200.0 + np.log(2.0)], rtol=1e-6)
    g = jax.jit(jax.grad(lambda z: losses.bernoulli_cross_entropy(z, t).sum()))(z)
    np.testing.assert_allclose(g, [[1.0, -1.0, 0.0]], atol=1e-7)  # sigmoid(z) - t


def test_bernoulli_cross_entropy_gradient_at_a_zero_logit():
    t = jnp.array([[0.0, 0.5, 1.0]])
    g = jax.jit(jax.grad(lambda z: losses.bernoulli_cross_entropy(z, t).sum()))(jnp.zeros((1, 3)))
    np.testing.assert_allclose(g, 0.5 - t, atol=1e-7)  # sigmoid(0) - t


def test_kl_sparsity_finite_when_units_saturate():
    a = jnp.array([[0.0, 1.0, 0.2], [0.0, 1.0, 0.4]])
    value = jax.jit(losses.kl_sparsity)(a, 0.1)
    grad = jax.jit(jax.grad(losses.kl_sparsity))(a, 0.1)
    assert np.all(np.isfinite(grad))
    # The saturated units contribute KL(rho || eps) and KL(rho || 1 - eps), eps = 1e-6 as
    # float32 rounds it.
    lo, hi, rho = float(np.float32(1e-6)), float(np.float32(1 - 1e-6)), 0.1
    kl = lambda r: rho * np.log(rho / r) + (1 - rho) * np.log((1 - rho) / (1 - r))
    np.testing.assert_allclose(value, kl(lo) + kl(hi) + kl(0.3), rtol=1e-4)
    # The unsaturated unit (mean 0.3 over 2 examples): d KL / d a_i = (1/2) dKL/d rho_hat.
    slope = (-rho / 0.3 + (1 - rho) / (1 - 0.3)) / 2
    np.testing.assert_allclose(grad[:, 2], [slope, slope], rtol=1e-5)


def test_kl_sparsity_is_per_unit_not_pooled():
    # Two units with means 0.0+ and 0.2: the pooled mean would be 0.1 = rho, penalty 0.
    a = np.array([[0.0, 0.2], [0.0, 0.2]]) + 1e-3
    got = jax.jit(losses.kl_sparsity)(jnp.asarray(a, jnp.float32), 0.1)
    np.testing.assert_allclose(got, _np_kl_sparsity(a, 0.1), rtol=1e-5)
    assert got > 0.05  # far from the pooled mean's KL(0.1 || 0.101), about 6e-6


def test_l2_weight_decay_counts_matrices_not_biases():
    w1, w2 = RNG.normal(size=(3, 4)), RNG.normal(size=(4, 2))
    params = {
        "enc": {"kernel": w1, "bias": RNG.normal(size=4)},
        "dec": {"kernel": w2},
        "bias": RNG.normal(size=2),
    }
    got = jax.jit(losses.l2_weight_decay)(params)
    np.testing.assert_allclose(got, 0.5 * ((w1**2).sum() + (w2**2).sum()), rtol=1e-6)
    grads = jax.grad(losses.l2_weight_decay)(jax.tree.map(jnp.asarray, params))
    assert np.all(grads["enc"]["bias"] == 0) and np.all(grads["bias"] == 0)
    np.testing.assert_allclose(grads["dec"]["kernel"], w2, rtol=1e-6)


def test_softmax_cross_entropy_extreme_logits():
    z = jnp.array([[1000.0, 0.0], [0.0, 1000.0]])
    np.testing.assert_allclose(losses.softmax_cross_entropy(z, jnp.array([0, 0])), [0.0, 1000.0])


# ------------------------------------------------------------- every float precision

LOW = [jnp.bfloat16, jnp.float16]


def _np_contractive_of_h(h, w):
    """||J||_F^2 per example from the Jacobian ``h_j (1 - h_j) W_ij`` built explicitly."""
    jac = (h * (1 - h))[:, :, None] * w.T[None]  # [batch, units, in]
    return (jac**2).sum((1, 2))


# The losses as functions of their own inputs (the activations given, not computed).
DIRECT = {
    **{k: v for k, v in CASES.items() if k != "contractive_penalty"},
    "contractive_penalty": (
        losses.contractive_penalty,
        _np_contractive_of_h,
        (_unit((4, 5)), RNG.normal(size=(3, 5))),
    ),
    "l2_weight_decay": (
        lambda w, b: losses.l2_weight_decay({"kernel": w, "bias": b}),
        lambda w, b: 0.5 * (w**2).sum(),
        (RNG.normal(size=(3, 5)), RNG.normal(size=(5,))),
    ),
}


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(DIRECT))
def test_low_precision_inputs_are_computed_in_float32(name, dtype):
    """bfloat16 and float16 inputs give float32 values: numpy's on the rounded inputs
    to float32's precision, and on the exact inputs to the rounding's; gradients in
    the input's dtype, equal to float32's on the rounded inputs."""
    fn, ref, args = DIRECT[name]
    low = [jnp.asarray(a, dtype) for a in args]
    rounded = [np.asarray(a.astype(jnp.float32), np.float64) for a in low]
    total = jax.grad(lambda *a: jnp.sum(fn(*a)))
    # One program: the values and gradients at the low dtype, and float32's gradients.
    both = jax.jit(lambda low, wide: (fn(*low), total(*low), total(*wide)))
    got, grad, wide = both(low, [jnp.asarray(a, jnp.float32) for a in rounded])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref(*rounded), rtol=2e-5, atol=1e-5)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got, ref(*args), rtol=40 * eps, atol=40 * eps)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
    np.testing.assert_array_equal(grad, wide.astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, *LOW], ids=["float32", "bfloat16", "float16"])
def test_saturated_inputs_give_finite_values_and_gradients_at_every_precision(dtype):
    """A sigmoid unit driven to exactly 1 (pre-activation 9, 20 or 1e4; 7 already
    rounds to 1 in bfloat16), logits near the dtype's largest value, and sums that
    overflow the dtype itself: values and gradients stay finite."""
    big = float(jnp.finfo(dtype).max) / 2
    pre = jnp.asarray([[9.0, 20.0, 1e4, -1e4, 0.0]] * 3, dtype)  # [batch 3, units 5]
    h = jax.nn.sigmoid(pre)
    assert h.dtype == dtype and float(h[0, 2]) == 1.0 and float(h[0, 3]) == 0.0
    logits = jnp.asarray([[big, -big, 0.0]], dtype)
    wide = jnp.full((1, 784), 200.0, dtype)  # 784 * 200**2: past float16's 65504
    checks = {
        "kl_sparsity": (lambda p: losses.kl_sparsity(jax.nn.sigmoid(p), 0.05), pre),
        "contractive": (lambda p: losses.contractive_penalty(jax.nn.sigmoid(p), p), pre),
        "bernoulli": (lambda z: losses.bernoulli_cross_entropy(z, jnp.ones_like(z)), logits),
        "softmax": (lambda z: losses.softmax_cross_entropy(z, jnp.array([1])), logits),
        "squared": (lambda x: losses.squared_error(x, -x), wide),
        "l1": (losses.l1_activity, wide),
        "l2": (lambda x: losses.l2_weight_decay({"kernel": x}), wide),
    }
    for name, (fn, x) in checks.items():
        value, grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(fn(a))))(x)  # noqa: B023
        assert np.isfinite(float(value)), (name, value)
        assert grad.dtype == dtype, name
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), (name, grad)
    sq = float(losses.squared_error(wide, -wide)[0])
    assert sq == pytest.approx(784 * 400.0**2, rel=1e-6)


# ------------------------------------------------------------------ across devices

SHARDED_KL = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from sae_jax import losses
from test_losses import _np_kl_sparsity

assert jax.device_count() == 4
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
a = np.random.default_rng(0).uniform(0.05, 0.95, (16, 5))
a[:4] *= 0.1  # the first device's rows far from the others'
rho = 0.2


def on_each_device(fn, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("batch"), out_specs=out_specs))


x = jnp.asarray(a, jnp.float32)
loss = lambda x: losses.kl_sparsity(x, rho, axis_name="batch")
value, grad = on_each_device(jax.value_and_grad(loss), (P(), P("batch")))(x)
np.testing.assert_allclose(value, _np_kl_sparsity(a, rho), rtol=1e-5)
whole = jax.jit(jax.grad(lambda x: losses.kl_sparsity(x, rho)))(x)
np.testing.assert_allclose(grad, whole, rtol=1e-5)
# Without axis_name each device has its own rows' penalty: the check above is not vacuous.
apart = on_each_device(lambda x: losses.kl_sparsity(x, rho)[None], P("batch"))(x)
assert not np.allclose(apart, value, rtol=1e-2), (apart, value)
print("kl_sparsity over 4 devices: the global value and gradient")
"""


def test_kl_sparsity_with_axis_name_is_the_global_penalty_under_shard_map():
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_KL], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the global value and gradient" in proc.stdout
