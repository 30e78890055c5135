"""Flax Linen models: an autoencoder layer and the classifier stack.

Models are used through ``init``/``apply`` only; parameters are plain nested dicts
of arrays, and everything that trains them sees pytrees.

Parameter layout:
  Autoencoder: ``{"params": {"encoder": {"kernel": [in, out], "bias": [out]},
                "decoder_bias": [in], "decoder_kernel": [out, in] (untied only)}}``
  Classifier:  ``{"params": {"encoders_0": {...}, ..., "head": {"kernel", "bias"}}}``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import linen as nn

from sae_jax.config import Config, LayerConfig
from sae_jax.corruption import dropout

# XLA's matmul precision by the name of ``Config.matmul_precision``.
PRECISIONS = {
    "default": None,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}

# A variables pytree as ``Module.init`` returns it: a dict, or a ``FrozenDict`` when
# Flax is configured to return those.
Params = Mapping[str, Any]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "linear": lambda z: z,
}


def to_float(x: jax.Array) -> jax.Array:
    """uint8 pixels ``[..., f]`` to float32 in ``[0, 1]``; float input is returned as is."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation called ``name`` (sigmoid, relu or linear)."""
    return _ACTIVATIONS[name]


def uniform_init(fan_in: int, fan_out: int) -> Callable[..., jax.Array]:
    """Initializer drawing from ``U(-r, r)`` with ``r = sqrt(6 / (fan_in + fan_out))``.

    The same range is used for a layer's biases when ``bias_init="uniform"``.
    """
    limit = math.sqrt(6.0 / (fan_in + fan_out))

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _bias_init(kind: str, fan_in: int, fan_out: int) -> Callable[..., jax.Array]:
    return uniform_init(fan_in, fan_out) if kind == "uniform" else nn.initializers.zeros


def keep_top_k(h: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest entries of each row of ``h`` and zero the rest.

    Args:
      h: ``[..., units]``.
      k: how many units stay active per example.

    Returns:
      ``[..., units]``; gradients flow through the kept entries only. Entries tied
      with the k-th largest are all kept.
    """
    kth = jax.lax.top_k(h, k)[0][..., -1:]
    return jnp.where(h >= jax.lax.stop_gradient(kth), h, jnp.zeros((), h.dtype))


class Encoder(nn.Module):
    """``h = act(x W + b)``, optionally keeping only the top ``k`` units.

    Input ``[batch, in_features]``, output ``[batch, features]``. As Flax's ``Dense``:
    computed in ``dtype`` (None: the inputs' and params' promoted dtype) with the
    params stored in ``param_dtype``, the matmul at ``precision``.
    """

    in_features: int
    features: int
    activation: str = "sigmoid"
    top_k: int | None = None
    bias_init: str = "uniform"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def setup(self) -> None:
        self.kernel = self.param(
            "kernel",
            uniform_init(self.in_features, self.features),
            (self.in_features, self.features),
            self.param_dtype,
        )
        self.bias = self.param(
            "bias",
            _bias_init(self.bias_init, self.in_features, self.features),
            (self.features,),
            self.param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = nn.dtypes.promote_dtype(x, self.kernel, self.bias, dtype=self.dtype)
        h = activation_fn(self.activation)(jnp.dot(x, kernel, precision=self.precision) + bias)
        if self.top_k is not None:
            h = keep_top_k(h, self.top_k)
        return h


class Autoencoder(nn.Module):
    """One autoencoder layer: ``x -> h -> z``, tied or untied decoder weights.

    ``__call__(x)`` returns ``(h, z)``: the code ``[batch, features]`` and the decoder's
    pre-activation ``[batch, in_features]``; apply ``decoder_activation`` (or use a
    loss on logits) to get the reconstruction. ``dtype``, ``param_dtype`` and
    ``precision`` as for ``Encoder``.
    """

    in_features: int
    features: int
    activation: str = "sigmoid"
    decoder_activation: str = "sigmoid"
    tied: bool = False
    top_k: int | None = None
    bias_init: str = "uniform"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def setup(self) -> None:
        self.encoder = Encoder(
            self.in_features, self.features, self.activation, self.top_k, self.bias_init,
            self.dtype, self.param_dtype, self.precision,
        )  # fmt: skip
        if not self.tied:
            self.decoder_kernel = self.param(
                "decoder_kernel",
                uniform_init(self.features, self.in_features),
                (self.features, self.in_features),
                self.param_dtype,
            )
        self.decoder_bias = self.param(
            "decoder_bias",
            _bias_init(self.bias_init, self.features, self.in_features),
            (self.in_features,),
            self.param_dtype,
        )

    def encode(self, x: jax.Array) -> jax.Array:
        """``[batch, in_features] -> [batch, features]``."""
        return self.encoder(x)

    def decode_logits(self, h: jax.Array) -> jax.Array:
        """Decoder pre-activation, ``[batch, features] -> [batch, in_features]``."""
        kernel = self.encoder.kernel.T if self.tied else self.decoder_kernel
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, self.decoder_bias, dtype=self.dtype)
        return cast(jax.Array, jnp.dot(h, kernel, precision=self.precision) + bias)

    def decode(self, h: jax.Array) -> jax.Array:
        """Reconstruction, ``[batch, features] -> [batch, in_features]``."""
        return activation_fn(self.decoder_activation)(self.decode_logits(h))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encode(x)
        return h, self.decode_logits(h)


class Classifier(nn.Module):
    """Stacked encoders plus a softmax head: ``[batch, in] -> logits [batch, classes]``;
    ``dtype``, ``param_dtype`` and ``precision`` as for ``Encoder``."""

    in_features: int
    layer_features: tuple[int, ...]
    activations: tuple[str, ...]
    top_ks: tuple[int | None, ...]
    num_classes: int
    bias_init: str = "uniform"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def setup(self) -> None:
        sizes = (self.in_features, *self.layer_features)
        numerics = (self.bias_init, self.dtype, self.param_dtype, self.precision)
        layers = zip(sizes[:-1], sizes[1:], self.activations, self.top_ks, strict=True)
        self.encoders = [Encoder(*layer, *numerics) for layer in layers]
        self.head = Encoder(sizes[-1], self.num_classes, "linear", None, *numerics)

    def encode(self, x: jax.Array, depth: int | None = None) -> jax.Array:
        """The code of the first ``depth`` encoders (all of them by default)."""
        for encoder in self.encoders[:depth]:
            x = encoder(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.encode(x))

    def dropout_logits(
        self, x: jax.Array, key: jax.Array, input_keep: Any, hidden_keep: Any
    ) -> jax.Array:
        """Logits ``[batch, classes]`` with inverted dropout (``corruption.dropout``) on
        the input (keep probability ``input_keep``) and on every hidden code
        (``hidden_keep``), as in training; ``__call__`` is the evaluated network."""
        keys = jax.random.split(key, len(self.encoders) + 1)
        x = dropout(keys[0], x, input_keep)
        for encoder, k in zip(self.encoders, keys[1:], strict=True):
            x = dropout(k, encoder(x), hidden_keep)
        return self.head(x)


def config_numerics(config: Config) -> dict[str, Any]:
    """The ``dtype``, ``param_dtype`` and ``precision`` of ``config``'s modules."""
    return {
        "dtype": jnp.dtype(config.dtype),
        "param_dtype": jnp.dtype(config.param_dtype),
        "precision": PRECISIONS[config.matmul_precision],
    }


def autoencoder(
    layer: LayerConfig, in_features: int, bias_init: str, **numerics: Any
) -> Autoencoder:
    """The ``Autoencoder`` module for one configured layer; ``numerics``: its
    ``dtype``, ``param_dtype`` and ``precision`` (see ``config_numerics``)."""
    return Autoencoder(
        in_features=in_features,
        features=layer.features,
        activation=layer.activation,
        decoder_activation=layer.decoder_activation,
        tied=layer.tied,
        top_k=layer.top_k,
        bias_init=bias_init,
        **numerics,
    )


def classifier(config: Config) -> Classifier:
    """The ``Classifier`` module for a configured stack."""
    return Classifier(
        in_features=config.input_features,
        layer_features=tuple(layer.features for layer in config.layers),
        activations=tuple(layer.activation for layer in config.layers),
        top_ks=tuple(layer.top_k for layer in config.layers),
        num_classes=config.num_classes,
        bias_init=config.bias_init,
        **config_numerics(config),
    )


def softmax_head(config: Config) -> Encoder:
    """The linear softmax head alone, ``[batch, top features] -> [batch, classes]``."""
    top = config.layers[-1].features
    return Encoder(
        top, config.num_classes, "linear", None, config.bias_init, **config_numerics(config)
    )


def init_params(module: nn.Module, key: jax.Array, in_features: int) -> Params:
    """Initialize ``module`` for inputs ``[batch, in_features]``."""
    return module.init(key, jnp.zeros((1, in_features), jnp.float32))


@dataclass(frozen=True)
class FrozenLayer:
    """A pretrained autoencoder layer: its module and its (no longer trained) params."""

    module: Autoencoder
    params: Params

    @property
    def encoder_params(self) -> Params:
        """``{"kernel": [in, out], "bias": [out]}`` of the encoder half."""
        encoder: Params = self.params["params"]["encoder"]
        return encoder

    def encode(self, x: jax.Array) -> jax.Array:
        """``[batch, in_features] -> [batch, features]``."""
        # Flax types ``apply`` as ``Any | tuple[Any, variables]``; the tuple comes back
        # only when ``mutable`` is passed.
        return cast(jax.Array, self.module.apply(self.params, x, method=Autoencoder.encode))


def compose(layers: Sequence[FrozenLayer], head_params: Params) -> Params:
    """Classifier params from frozen layers and softmax-head params.

    Args:
      layers: the pretrained layers, bottom first.
      head_params: ``{"params": {"kernel": [top, classes], "bias": [classes]}}``.

    Returns:
      ``{"params": {"encoders_i": ..., "head": ...}}`` for ``Classifier``.
    """
    tree = {f"encoders_{i}": layer.encoder_params for i, layer in enumerate(layers)}
    tree["head"] = head_params["params"]
    return {"params": tree}
