"""Corruption processes, checked statistically on large arrays under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import corruption

N = 200_000
X = jax.random.uniform(jax.random.PRNGKey(1), (N // 100, 100), minval=0.2, maxval=0.8)
KEY = jax.random.PRNGKey(7)


def _within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_masking_destroys_rate_and_does_not_rescale(rate):
    out = np.asarray(jax.jit(corruption.masking_noise)(KEY, X, rate))
    x = np.asarray(X)
    destroyed = out == 0
    assert _within_binomial(destroyed.sum(), N, rate)
    np.testing.assert_array_equal(out[~destroyed], x[~destroyed])  # survivors untouched


def test_gaussian_noise_moments():
    out = np.asarray(jax.jit(corruption.gaussian_noise)(KEY, X, 0.3))
    noise = out - np.asarray(X)
    assert abs(noise.mean()) < 5 * 0.3 / np.sqrt(N)
    assert abs(noise.std() - 0.3) < 0.01


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_salt_and_pepper_fraction_and_balance(rate):
    out = np.asarray(jax.jit(corruption.salt_and_pepper)(KEY, X, rate))
    salt, pepper = out == 1.0, out == 0.0  # X lies in [0.2, 0.8], so these are all corrupted
    hit = salt | pepper
    assert _within_binomial(hit.sum(), N, rate)
    assert _within_binomial(salt.sum(), int(hit.sum()), 0.5)
    np.testing.assert_array_equal(out[~hit], np.asarray(X)[~hit])


@pytest.mark.parametrize("kind", sorted(corruption.CORRUPTIONS))
def test_same_key_same_noise_other_key_other_noise_and_vmap(kind):
    fn = jax.jit(corruption.CORRUPTIONS[kind])
    a = np.asarray(fn(KEY, X, 0.3))
    np.testing.assert_array_equal(a, fn(KEY, X, 0.3))
    keys = jax.random.split(KEY, 3)
    batched = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(keys, X, 0.3)
    outs = [np.asarray(fn(k, X, 0.3)) for k in keys]
    for i in range(3):
        np.testing.assert_array_equal(batched[i], outs[i])
    # Another key corrupts other entries: about 2 * 0.3 * 0.7 of them differ (gaussian: all).
    for other in outs:
        changed = np.mean(other != a)
        assert changed > 0.3, f"{kind}: another key changed only {changed:.1%} of the entries"


def _reference(key, x, kind, level):
    """The documented corruptions written out in numpy, from the same uniform/normal draws."""
    x = np.asarray(x)
    if kind == "masking":  # each entry destroyed (set to 0) where its draw is below the rate
        return np.where(np.asarray(jax.random.uniform(key, x.shape)) < level, 0.0, x)
    if kind == "gaussian":
        return x + level * np.asarray(jax.random.normal(key, x.shape))
    # salt_and_pepper: each destroyed entry becomes 0 or 1, with probability 1/2 each.
    hit_key, salt_key = jax.random.split(key)
    hit = np.asarray(jax.random.uniform(hit_key, x.shape)) < level
    salt = np.asarray(jax.random.bernoulli(salt_key, 0.5, x.shape))
    return np.where(hit, np.where(salt, 1.0, 0.0), x)


@pytest.mark.parametrize(
    "kind,level", [("masking", 0.2), ("gaussian", 0.3), ("salt_and_pepper", 0.4)]
)
def test_corrupt_matches_numpy_formula(kind, level):
    got = jax.jit(corruption.corrupt, static_argnums=2)(KEY, X, kind, level)
    np.testing.assert_allclose(got, _reference(KEY, X, kind, level), rtol=1e-6, atol=1e-7)


def test_corrupt_dispatch():
    np.testing.assert_array_equal(corruption.corrupt(KEY, X, "none", 0.0), X)
    with pytest.raises(ValueError, match="unknown corruption 'bogus'"):
        corruption.corrupt(KEY, X, "bogus", 0.1)


def test_rate_zero_is_identity():
    np.testing.assert_array_equal(corruption.masking_noise(KEY, X, 0.0), X)
    np.testing.assert_array_equal(corruption.salt_and_pepper(KEY, X, 0.0), X)
    assert jnp.all(corruption.masking_noise(KEY, X, 1.0) == 0)


def test_rate_zero_spares_an_entry_whose_draw_is_exactly_zero():
    # A uniform draw is 0.0 with probability 2**-23: among these 2**22 draws of key 8, the
    # masking draw and the salt-and-pepper hit draw each hold one. "Destroyed with
    # probability rate" means rate 0 destroys nothing, so the comparison must be strict.
    key, n = jax.random.PRNGKey(8), 1 << 22
    x = jnp.full((n,), 0.5)
    assert int(jnp.sum(jax.random.uniform(key, (n,)) == 0)) == 1
    assert int(jnp.sum(jax.random.uniform(jax.random.split(key)[0], (n,)) == 0)) == 1
    for fn in (corruption.masking_noise, corruption.salt_and_pepper):
        out = jax.jit(fn)(key, x, 0.0)
        assert int(jnp.sum(out != x)) == 0, fn.__name__


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_dropout_keeps_with_probability_keep_and_scales_by_its_inverse(keep):
    out = np.asarray(jax.jit(corruption.dropout)(KEY, X, keep))
    x = np.asarray(X)
    kept = out != 0
    assert _within_binomial(kept.sum(), N, keep)
    np.testing.assert_allclose(out[kept], x[kept] / keep, rtol=1e-6)  # inverted scaling
    assert abs(out.mean() - x.mean()) < 5 * x.std() / np.sqrt(N) / keep  # unbiased
    np.testing.assert_array_equal(jax.jit(corruption.dropout)(KEY, X, 1.0), X)


def test_classifier_dropout_logits_match_a_numpy_forward_pass_and_eval_has_none():
    from sae_jax.config import tiny
    from sae_jax.models import classifier, init_params
    from sae_jax.training.objectives import classifier_loss

    config = tiny().replace(input_features=6)
    model = classifier(config)
    params = init_params(model, jax.random.PRNGKey(0), 6)
    x = np.asarray(jax.random.uniform(KEY, (5, 6)))
    key = jax.random.PRNGKey(3)
    got = jax.jit(lambda p, x, k: model.apply(p, x, k, 0.8, 0.5, method="dropout_logits"))(
        params, x, key
    )
    # The reference: the same masks (uniform draws below keep), numpy arithmetic.
    keys = jax.random.split(key, 3)
    mask = lambda k, shape, keep: np.asarray(jax.random.uniform(k, shape)) < keep
    p = jax.tree.map(np.asarray, params["params"])
    h = np.where(mask(keys[0], x.shape, 0.8), x / 0.8, 0.0)
    for i in range(2):
        h = 1 / (1 + np.exp(-(h @ p[f"encoders_{i}"]["kernel"] + p[f"encoders_{i}"]["bias"])))
        h = np.where(mask(keys[i + 1], h.shape, 0.5), h / 0.5, 0.0)
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    typed = model.apply(params, x, jax.random.key(3), 0.8, 0.5, method="dropout_logits")
    np.testing.assert_allclose(typed, expected, rtol=1e-5, atol=1e-6)  # the same bits
    # Evaluation runs the whole network; keep = 1 is that network, whatever the key.
    whole = model.apply(params, x)
    same = model.apply(params, x, key, 1.0, 1.0, method="dropout_logits")
    np.testing.assert_allclose(same, whole, rtol=1e-6)
    batch = (x, np.array([0, 1, 2, 3, 4]))
    plain = classifier_loss(model)(params, batch, key)[0]
    dropped = jax.jit(classifier_loss(model, input_keep=0.8, hidden_keep=0.5))
    assert dropped(params, batch, key)[0] != plain
    keep = {"input_keep": jnp.float32(0.8), "hidden_keep": jnp.float32(0.5)}
    swept = classifier_loss(model, dropout=True)(params, batch, key, hparams=keep)
    np.testing.assert_allclose(swept[0], dropped(params, batch, key)[0], rtol=1e-6)


# ------------------------------------------------------------- every float precision

LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
BY_NAME = {
    "masking": lambda k, x: corruption.masking_noise(k, x, 0.3),
    "gaussian": lambda k, x: corruption.gaussian_noise(k, x, 0.3),
    "salt_and_pepper": lambda k, x: corruption.salt_and_pepper(k, x, 0.3),
    "dropout": lambda k, x: corruption.dropout(k, x, 0.7),
}


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("kind", BY_NAME)
def test_low_precision_corruption_is_the_float32_one_rounded(kind, dtype):
    """The same entries destroyed, the same noise and scales as in float32, then one
    rounding to the input's dtype; gradients finite, in that dtype."""
    low = X[:40].astype(dtype)
    fn = jax.jit(BY_NAME[kind])
    got, want = fn(KEY, low), fn(KEY, low.astype(jnp.float32))
    assert got.dtype == dtype and got.shape == low.shape
    got, want = np.asarray(got, np.float32), np.asarray(want.astype(dtype), np.float32)
    if kind == "gaussian":  # x + stddev * noise may be fused (one rounding) in either
        np.testing.assert_allclose(got, want, rtol=float(jnp.finfo(dtype).eps), atol=0)
    else:
        np.testing.assert_array_equal(got, want)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(BY_NAME[kind](KEY, x).astype(jnp.float32))))(low)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("kind", ["gaussian", "dropout"])
def test_noise_that_scales_or_adds_refuses_integer_images(kind):
    with pytest.raises(ValueError, match=r"x must have a floating-point dtype .* got uint8"):
        BY_NAME[kind](KEY, np.zeros((2, 3), np.uint8))


@pytest.mark.parametrize("kind", BY_NAME)
def test_typed_keys_draw_what_legacy_keys_of_the_same_seed_draw(kind):
    fn = jax.jit(BY_NAME[kind])
    np.testing.assert_array_equal(fn(jax.random.key(7), X[:20]), fn(KEY, X[:20]))
