"""Autoencoder layers, top-k codes, the classifier stack and the seed's layer loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.config import LayerConfig, seed, tiny
from sae_jax.corruption import corrupt
from sae_jax.inference import TrainedModel
from sae_jax.models import (
    Autoencoder,
    FrozenLayer,
    autoencoder,
    classifier,
    compose,
    init_params,
    keep_top_k,
    softmax_head,
)
from sae_jax.training import layerwise, objectives
from sae_jax.training.objectives import layer_loss

KEY = jax.random.PRNGKey(3)


def _np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("tied", [False, True])
def test_autoencoder_forward_matches_numpy(tied):
    module = Autoencoder(in_features=6, features=4, tied=tied)
    params = init_params(module, KEY, 6)
    p = jax.tree.map(np.asarray, params["params"])
    assert ("decoder_kernel" in p) != tied
    x = np.asarray(jax.random.uniform(KEY, (3, 6)))
    h, z = jax.jit(module.apply)(params, x)
    h_ref = _np_sigmoid(x @ p["encoder"]["kernel"] + p["encoder"]["bias"])
    w_dec = p["encoder"]["kernel"].T if tied else p["decoder_kernel"]
    np.testing.assert_allclose(h, h_ref, rtol=1e-5)
    np.testing.assert_allclose(z, h_ref @ w_dec + p["decoder_bias"], rtol=1e-5, atol=1e-6)


def test_seed_init_is_uniform_including_biases():
    module = Autoencoder(in_features=784, features=1000, bias_init="uniform")
    p = init_params(module, KEY, 784)["params"]
    limit = np.sqrt(6 / 1784)
    for leaf in (
        p["encoder"]["kernel"],
        p["encoder"]["bias"],
        p["decoder_kernel"],
        p["decoder_bias"],
    ):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= limit
        assert np.abs(leaf).max() > 0.95 * limit  # spans the range: not zeros, not narrower
    zeros = init_params(Autoencoder(4, 3, bias_init="zeros"), KEY, 4)["params"]
    assert np.all(np.asarray(zeros["encoder"]["bias"]) == 0)


@pytest.mark.parametrize(
    "activation,fn", [("relu", lambda z: np.maximum(z, 0)), ("linear", lambda z: z)]
)
def test_other_activations(activation, fn):
    module = Autoencoder(in_features=5, features=7, activation=activation)
    params = init_params(module, KEY, 5)
    x = np.asarray(jax.random.normal(KEY, (4, 5)))
    p = params["params"]["encoder"]
    h = module.apply(params, x, method=Autoencoder.encode)
    np.testing.assert_allclose(
        h, fn(x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])), rtol=1e-5, atol=1e-6
    )


def test_top_k_keeps_k_largest_per_row():
    h = jax.random.uniform(KEY, (8, 20))
    out = np.asarray(jax.jit(keep_top_k, static_argnums=1)(h, 3))
    assert np.all((out != 0).sum(-1) == 3)
    expected_kept = np.argsort(-np.asarray(h), axis=-1)[:, :3]
    for row, kept in zip(out, expected_kept, strict=True):
        assert set(np.flatnonzero(row)) == set(kept)
    module = Autoencoder(in_features=6, features=10, top_k=2)
    codes = module.apply(init_params(module, KEY, 6), jnp.ones((5, 6)), method=Autoencoder.encode)
    assert np.all((np.asarray(codes) != 0).sum(-1) == 2)


def test_classifier_composed_from_frozen_layers():
    config = seed().replace(
        layers=(LayerConfig(features=8), LayerConfig(features=6)), input_features=12, num_classes=3
    )
    k1, k2, k3 = jax.random.split(KEY, 3)
    layers = [
        FrozenLayer(autoencoder(config.layers[0], 12, "uniform"), None),
        FrozenLayer(autoencoder(config.layers[1], 8, "uniform"), None),
    ]
    layers = [
        FrozenLayer(lay.module, init_params(lay.module, k, lay.module.in_features))
        for lay, k in zip(layers, (k1, k2), strict=True)
    ]
    head = softmax_head(config)
    head_params = init_params(head, k3, 6)
    params = compose(layers, head_params)
    x = jax.random.uniform(KEY, (4, 12))
    model = classifier(config)
    code = layers[1].encode(layers[0].encode(x))
    np.testing.assert_allclose(
        model.apply(params, x, 2, method=type(model).encode), code, rtol=1e-6
    )
    np.testing.assert_allclose(model.apply(params, x), head.apply(head_params, code), rtol=1e-5)
    # The composed tree is exactly the classifier's own layout.
    own = init_params(model, KEY, 12)
    assert jax.tree.structure(own) == jax.tree.structure(params)


def test_seed_layer_loss_matches_numpy_formula():
    layer = seed().layers[0]
    module = autoencoder(layer, 20, "uniform")
    module = module.clone(features=8)
    params = init_params(module, KEY, 20)
    x = np.asarray(jax.random.uniform(KEY, (16, 20)))
    loss, terms = jax.jit(layer_loss(module, layer))(params, (x,), KEY)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    h = _np_sigmoid(x @ p["encoder"]["kernel"] + p["encoder"]["bias"])
    r = _np_sigmoid(h @ p["decoder_kernel"] + p["decoder_bias"])
    rh = h.mean(0)
    kl = (0.1 * np.log(0.1 / rh) + 0.9 * np.log(0.9 / (1 - rh))).sum()
    l2 = ((p["encoder"]["kernel"] ** 2).sum() + (p["decoder_kernel"] ** 2).sum()) / 2
    expected = ((r - x) ** 2).sum() + 3.0 * kl + 1e-4 * l2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(terms["sparsity"], 3.0 * kl, rtol=1e-5)


def _np_layer_terms(p, x, layer, x_in=None):
    """The per-layer loss documented on ``LayerConfig``, term by term, in float64 numpy.

    ``p`` is the autoencoder's ``params["params"]``; ``x_in`` the (corrupted) input
    that is encoded, ``x`` the clean target.
    """
    x_in = x if x_in is None else x_in
    reduce = np.sum if layer.batch_reduction == "sum" else np.mean
    w, b = p["encoder"]["kernel"], p["encoder"]["bias"]
    w_dec = w.T if layer.tied else p["decoder_kernel"]
    h = _np_sigmoid(x_in @ w + b)  # [batch, units]
    z = h @ w_dec + p["decoder_bias"]
    if layer.reconstruction == "cross_entropy":
        r = _np_sigmoid(z)
        rec = -(x * np.log(r) + (1 - x) * np.log(1 - r)).sum(-1)
    else:
        rec = ((_np_sigmoid(z) - x) ** 2).sum(-1)
    terms = {"reconstruction": layer.reconstruction_scale * reduce(rec)}
    if layer.beta:
        rho, rho_hat = layer.rho, h.mean(0)
        kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
        terms["sparsity"] = layer.beta * kl.sum()
    if layer.l1:
        terms["l1"] = layer.l1 * reduce(np.abs(h).sum(-1))
    if layer.contractive:
        # ||J_h(x)||_F^2 with J_ji = h_j (1 - h_j) W_ij, summed over i and j per example.
        jac = (h * (1 - h))[:, :, None] * w.T[None]  # [batch, units, in]
        terms["contractive"] = layer.contractive * reduce((jac**2).sum((1, 2)))
    if layer.weight_decay:
        matrices = [w] if layer.tied else [w, w_dec]
        terms["weight_decay"] = layer.weight_decay * sum((m**2).sum() for m in matrices) / 2
    return terms


# Each term switched on alone, then all of them, with both batch reductions.
ALL_TERMS = dict(rho=0.2, beta=0.7, l1=0.3, contractive=0.9, weight_decay=0.05)
LAYER_LOSS_CASES = {
    "reconstruction": {},
    "scaled_mean_reconstruction": dict(batch_reduction="mean", reconstruction_scale=0.5),
    "cross_entropy": dict(reconstruction="cross_entropy"),
    "sparsity": dict(rho=0.2, beta=0.7),
    "l1": dict(l1=0.3),
    "contractive": dict(contractive=0.9),
    "weight_decay": dict(weight_decay=0.05),
    "all_sum": ALL_TERMS,
    "all_mean_tied": dict(ALL_TERMS, batch_reduction="mean", tied=True),
    "all_cross_entropy_mean": dict(
        ALL_TERMS, reconstruction="cross_entropy", batch_reduction="mean"
    ),
}


def _layer_case(case):
    layer = LayerConfig(features=4, **LAYER_LOSS_CASES[case])
    module = autoencoder(layer, 6, "uniform")
    params = init_params(module, KEY, 6)
    x = np.random.default_rng(1).uniform(0.05, 0.95, (7, 6))
    return layer, module, params, x


@pytest.mark.parametrize("case", sorted(LAYER_LOSS_CASES))
def test_layer_loss_matches_numpy_formula(case):
    layer, module, params, x = _layer_case(case)
    loss, terms = jax.jit(layer_loss(module, layer))(params, (x.astype(np.float32),), KEY)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    expected = _np_layer_terms(p, x, layer)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(loss, sum(expected.values()), rtol=2e-5)


@pytest.mark.parametrize("case", ["all_sum", "all_mean_tied", "all_cross_entropy_mean"])
def test_layer_loss_gradient_matches_numpy_finite_differences(case):
    layer, module, params, x = _layer_case(case)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    with jax.enable_x64(True):
        grads = jax.jit(jax.grad(lambda p: layer_loss(module, layer)(p, (x,), KEY)[0]))(params)
    leaves = jax.tree.leaves(params)
    eps = 1e-6
    for leaf, grad in zip(leaves, jax.tree.leaves(grads), strict=True):
        numeric = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            original = leaf[i]
            leaf[i] = original + eps  # the numpy loss reads the leaves in place
            hi = sum(_np_layer_terms(params["params"], x, layer).values())
            leaf[i] = original - eps
            lo = sum(_np_layer_terms(params["params"], x, layer).values())
            leaf[i] = original
            numeric[i] = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-5, atol=1e-6)


def test_denoising_loss_compares_with_the_clean_input():
    layer = LayerConfig(
        features=5, noise="masking", noise_level=0.5, reconstruction="cross_entropy"
    )
    module = autoencoder(layer, 10, "zeros")
    params = init_params(module, KEY, 10)
    x = np.asarray(jax.random.uniform(KEY, (4, 10)), np.float64)
    _, terms = jax.jit(layer_loss(module, layer))(params, (x.astype(np.float32),), KEY)
    # Masking noise: each entry is zeroed where its uniform draw falls below the rate.
    destroyed = np.asarray(jax.random.uniform(KEY, x.shape)) < 0.5
    assert 0 < destroyed.sum() < destroyed.size
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    expected = _np_layer_terms(p, x, layer, x_in=np.where(destroyed, 0.0, x))
    np.testing.assert_allclose(terms["reconstruction"], expected["reconstruction"], rtol=1e-5)
    clean = _np_layer_terms(p, x, layer)  # what a loss that forgot the noise would give
    assert not np.isclose(expected["reconstruction"], clean["reconstruction"], rtol=1e-3)


def _pretraining_masks(monkeypatch):
    """Pretrain a masking-noise layer on all-ones inputs for 2 epochs of 4 steps and
    record, step by step, which entries of the minibatch the corruption destroyed."""
    masks = []

    def recording(key, x, kind, level):
        out = corrupt(key, x, kind, level)
        jax.debug.callback(lambda o: masks.append(np.asarray(o) == 0), out, ordered=True)
        return out

    monkeypatch.setattr(objectives, "corrupt", recording)
    objectives._layer_loss.cache_clear()  # trace the loss again, with the recording
    layer = LayerConfig(features=3, noise="masking", noise_level=0.5, epochs=2)
    layerwise.pretrain_layer(layer, 10, jnp.ones((20, 10)), key=jax.random.PRNGKey(0), batch_size=5)
    return masks


def test_pretraining_draws_new_corruption_every_step(monkeypatch):
    masks = _pretraining_masks(monkeypatch)
    assert len(masks) == 8 and all(m.shape == (5, 10) for m in masks)
    assert 0.3 < np.mean(masks) < 0.7  # about half of the entries destroyed
    distinct = {m.tobytes() for m in masks}
    assert len(distinct) == 8, "two steps destroyed the same entries"
    again = _pretraining_masks(monkeypatch)  # the same seed: the same noise
    assert [m.tobytes() for m in again] == [m.tobytes() for m in masks]


def _mnist_model() -> TrainedModel:
    config = tiny()
    return TrainedModel(config, init_params(classifier(config), jax.random.PRNGKey(0), 784))


_PIXELS = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros((0, 784), np.uint8), r"expected images \[n, 784\] or \[n, 28, 28\] with n >= 1"),
        (_PIXELS[0], r"\[n, 784\] or \[n, 28, 28\]; got shape \(28, 28\): .*images\[None\]"),
        (_PIXELS[0].reshape(784), r"got shape \(784,\): for one image pass images\[None\]"),
        (_PIXELS.reshape(3, 784)[:, :783], r"expected images \[n, 784\].*got shape \(3, 783\)"),
        (_PIXELS[:, 1:], r"expected images \[n, 784\] or \[n, 28, 28\]; got shape \(3, 27, 28\)"),
        (_PIXELS.astype(np.int64), r"uint8 pixels or floats in \[0, 1\]; got dtype int64"),
        (_PIXELS.astype(np.float32), r"float images must be in \[0, 1\] \(got max 255\.0\)"),
        (
            np.linspace(-0.5, 0.5, 3 * 784).reshape(3, 784),
            r"float images must be in \[0, 1\] \(got min -0\.5",
        ),
        (np.full((3, 784), np.nan, np.float32), r"float images must be in \[0, 1\] \(got NaN\)"),
    ],
    ids=[
        "empty",
        "one_28x28",
        "one_784",
        "783_features",
        "27x28",
        "int64",
        "float255",
        "negative",
        "nan",
    ],
)
def test_trained_model_refuses_images_it_cannot_use(images, match):
    model = _mnist_model()
    with pytest.raises(ValueError, match=match):
        model.predict(images)
    with pytest.raises(ValueError, match=match):
        model.encode(images)


def test_trained_model_takes_uint8_and_float_images_flat_or_square():
    model = _mnist_model()
    logits = model.predict(_PIXELS)
    assert logits.shape == (3, 10)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), model.params["params"])
    h = _PIXELS.reshape(3, 784) / 255.0  # uint8 pixels are scaled to [0, 1]
    for i in range(2):
        h = _np_sigmoid(h @ p[f"encoders_{i}"]["kernel"] + p[f"encoders_{i}"]["bias"])
    np.testing.assert_allclose(model.encode(_PIXELS), h, rtol=1e-5, atol=1e-6)
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    for images in (_PIXELS.reshape(3, 784), _PIXELS.astype(np.float32) / 255, jnp.asarray(_PIXELS)):
        np.testing.assert_allclose(model.predict(images), logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_modules_compute_in_dtype_on_float32_params(dtype):
    """``Config.dtype``: the matmuls and activations in that dtype, the params (and so
    the optimizer state) in float32; the codes, reconstructions and logits agree with
    float32's to the dtype's precision, and the gradients are float32 and finite."""
    from sae_jax import losses
    from sae_jax.models import config_numerics

    config = tiny().replace(dtype=dtype)
    wide = tiny()
    low_ae = autoencoder(config.layers[0], 784, "uniform", **config_numerics(config))
    ae = autoencoder(wide.layers[0], 784, "uniform", **config_numerics(wide))
    params = init_params(low_ae, jax.random.PRNGKey(0), 784)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 784))
    (h, z), (h32, z32) = low_ae.apply(params, x), ae.apply(params, x)
    assert h.dtype == z.dtype == jnp.dtype(dtype)
    tolerance = 8 * float(jnp.finfo(dtype).eps)  # a few roundings of a 784-term sum
    np.testing.assert_allclose(np.float32(h), h32, atol=tolerance)
    np.testing.assert_allclose(np.float32(z), z32, atol=tolerance * np.abs(z32).max())

    def loss(module, p):
        h, z = module.apply(p, x)
        return losses.bernoulli_cross_entropy(z, x).mean() + losses.kl_sparsity(h, 0.05)

    grads = jax.jit(jax.grad(lambda p: loss(low_ae, p)))(params)
    grads32 = jax.jit(jax.grad(lambda p: loss(ae, p)))(params)
    for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32), strict=True):
        assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g32, atol=0.05 * np.abs(g32).max())
    model = classifier(config)
    clf_params = init_params(model, jax.random.PRNGKey(2), 784)
    assert {leaf.dtype for leaf in jax.tree.leaves(clf_params)} == {jnp.dtype("float32")}
    assert model.apply(clf_params, x).dtype == jnp.dtype(dtype)
    stored = init_params(classifier(config.replace(param_dtype=dtype)), jax.random.PRNGKey(2), 784)
    assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(dtype)}


def test_matmul_precision_reaches_every_matmul():
    x = jnp.ones((2, 784))
    for name, shown in [("highest", "HIGHEST"), ("high", "HIGH"), ("default", None)]:
        model = classifier(tiny().replace(matmul_precision=name))
        params = init_params(model, jax.random.PRNGKey(0), 784)
        program = str(jax.make_jaxpr(model.apply)(params, x))
        dots = program.count("dot_general")
        assert dots == 3  # two encoders and the head
        if shown is None:
            assert "Precision." not in program
        else:
            assert program.count(f"Precision.{shown}") >= dots, program


@pytest.mark.parametrize(
    "field, value, choices",
    [
        ("dtype", "float64", "float32, bfloat16, float16"),
        ("param_dtype", "int8", "float32, bfloat16, float16"),
        ("matmul_precision", "tf32", "default, high, highest"),
    ],
)
def test_precision_fields_refuse_other_values_naming_the_choices(field, value, choices):
    from sae_jax.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{field} must be one of {choices}; got '{value}'$"):
        tiny().replace(**{field: value}).validate()
