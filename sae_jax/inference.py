"""A trained stack ready for use on raw images: predict, encode, reconstruct; and
``load_model``, which builds one from a run's checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.config import Config
from sae_jax.config.files import RUN_KEY, config_from_json, read_config
from sae_jax.errors import CheckpointError
from sae_jax.files import manifest_problem, user_path
from sae_jax.models import (
    Autoencoder,
    Classifier,
    FrozenLayer,
    Params,
    autoencoder,
    classifier,
    config_numerics,
    init_params,
    to_float,
)
from sae_jax.workdir.checkpoint import STANDARDIZATION
from sae_jax.workdir.restore import checkpoint_manager, restore_intact


def _image_shapes(features: int) -> str:
    """The image shapes a model on ``features`` pixels takes, e.g. ``[n, 784] or [n, 28, 28]``."""
    side = math.isqrt(features)
    square = (
        f"[n, {side}, {side}]" if side * side == features else f"[n, H, W] with H*W = {features}"
    )
    return f"[n, {features}] or {square}"


def _check_shape(x: Any, features: int) -> tuple[int, ...]:
    shape, expected = tuple(x.shape), f"expected images {_image_shapes(features)}"
    one = len(shape) == 1 or (len(shape) == 2 and shape[1] != features)
    if one and math.prod(shape) == features:
        raise ValueError(f"{expected}; got shape {shape}: for one image pass images[None]")
    if not (
        (len(shape) == 2 and shape[1] == features)
        or (len(shape) >= 3 and math.prod(shape[1:]) == features)
    ):
        raise ValueError(f"{expected}; got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{expected} with n >= 1; got shape {shape}")
    return shape


def _check_images(
    x: Any, features: int, standardization: tuple[np.ndarray, np.ndarray] | None = None
) -> jax.Array:
    """Images as ``TrainedModel`` takes them, to float32 ``[n, features]`` as the network
    takes them: uint8 pixels scaled to ``[0, 1]``, floats in ``[0, 1]`` as they are, or,
    for a model trained on standardized data, any finite numbers standardized.

    Raises ``ValueError`` (one line naming the expected shape or rule) for anything
    ``TrainedModel``'s docstring does not allow.
    """
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    shape = _check_shape(x, features)
    if standardization is not None:
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"expected numbers; got dtype {x.dtype}")
        values = np.asarray(x, np.float32).reshape(shape[0], features)
        if not np.isfinite(values).all():
            raise ValueError("the inputs hold NaN or infinite values")
        mean, std = standardization
        return jnp.asarray((values - mean) / std)
    if jnp.issubdtype(x.dtype, jnp.floating):
        values = np.asarray(x)  # the API edge: the range check needs host values
        low, high = float(values.min()), float(values.max())
        if not 0 <= low <= high <= 1:
            got = "NaN" if math.isnan(high) else f"max {high}" if high > 1 else f"min {low}"
            fix = "divide by 255" if high > 1 else "floats in [0, 1]"
            raise ValueError(
                f"float images must be in [0, 1] (got {got}); pass uint8 pixels or {fix}"
            )
    elif x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels or floats in [0, 1]; got dtype {x.dtype}")
    return to_float(jnp.asarray(x).reshape(shape[0], features))


@dataclass(frozen=True)
class TrainedModel:
    """A trained stack ready for use: ``predict``, ``encode``, ``encoder`` and
    ``reconstruct`` on raw images.

    Images are ``[n, input_features]`` or ``[n, H, W]`` (any ``[n, ...]``) with
    ``H * W == input_features`` (for MNIST ``[n, 784]`` or ``[n, 28, 28]``), ``n >= 1``:
    uint8 pixels (scaled by 1/255) or floats already in ``[0, 1]``; for a model trained
    with ``--standardize``, any finite numbers, standardized with the training data's
    per-feature mean and std. Anything else raises a ``ValueError`` naming what was
    expected: one image without its batch axis (pass ``images[None]``), another number
    of pixels, floats outside ``[0, 1]`` or NaN, and other dtypes (int64, bool, ...).

    Attributes:
      config: the run's config.
      params: the fine-tuned classifier's params (``models.Classifier``); None for a
        run that only pretrained (data without labels).
      pretrained: the greedily pretrained autoencoders, bottom first, as they were
        before fine-tuning (encoder and decoder); empty for a run without pretraining.
      standardization: ``(mean, std)``, each ``[input_features]``, or None.
    """

    config: Config
    params: Params | None
    pretrained: tuple[FrozenLayer, ...] = ()
    standardization: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def module(self) -> Classifier:
        """The Flax module of the fine-tuned stack."""
        return classifier(self.config)

    def inputs(self, x: Any) -> jax.Array:
        """Images ``x`` checked and turned into the network's inputs, float32
        ``[n, input_features]``."""
        return _check_images(x, self.config.input_features, self.standardization)

    def _classifier(self) -> Params:
        if self.params is None:
            raise ValueError(
                "this run has no fine-tuned classifier (its data had no labels, or it "
                "stopped before fine-tuning ended); use encoder(depth) or reconstruct(x)"
            )
        return self.params

    def _depth(self, depth: int | None, available: int) -> int:
        depth = available if depth is None else depth
        if not 1 <= depth <= available:
            raise ValueError(f"depth must be in 1..{available}, got {depth}")
        return depth

    def predict(self, x: Any) -> jax.Array:
        """Logits ``[n, num_classes]`` of images ``x`` (see the class docstring)."""
        return _predict(self.module, self._classifier(), self.inputs(x))

    def encode(self, x: Any, depth: int | None = None) -> jax.Array:
        """The fine-tuned stack's code of layer ``depth`` (1-based; default the top),
        ``[n, features]``. ``x`` is images as for ``predict``."""
        params = self._classifier()
        depth = self._depth(depth, len(self.config.layers))
        return _encode_depth(self.module, params, self.inputs(x), depth)

    def _pretrained(self, depth: int | None) -> tuple[tuple[Autoencoder, ...], tuple]:
        """The modules and params of the first ``depth`` pretrained layers."""
        if not self.pretrained:
            raise ValueError("this run has no pretrained layers (it ran with --no_pretraining)")
        layers = self.pretrained[: self._depth(depth, len(self.pretrained))]
        return tuple(layer.module for layer in layers), tuple(layer.params for layer in layers)

    def encoder(self, depth: int | None = None) -> Callable[[Any], jax.Array]:
        """The unsupervised stack before fine-tuning, up to layer ``depth`` (default the
        top): a function of images ``[n, ...]`` (as for ``predict``) returning their
        codes ``[n, features of layer depth]``."""
        modules, params = self._pretrained(depth)
        return lambda x: _encode_layers(modules, params, self.inputs(x))

    def reconstruct(self, x: Any, depth: int = 1) -> jax.Array:
        """Images ``x`` encoded by the first ``depth`` pretrained autoencoders and
        decoded back down through their decoders: ``[n, input_features]``, in the
        inputs' scale (``[0, 1]`` for pixels; for a standardized model, the original
        units). Pass corrupted images to denoise them."""
        modules, params = self._pretrained(depth)
        out = _reconstruct(modules, params, self.inputs(x))
        if self.standardization is not None:
            mean, std = self.standardization
            out = out * std + mean
        return out


@partial(jax.jit, static_argnums=0)
def _predict(module: Classifier, params: Params, x: jax.Array) -> jax.Array:
    # Flax types apply's result as ``Any | tuple[Any, variables]`` (the tuple: with
    # ``mutable``, never passed here); likewise below.
    return cast(jax.Array, module.apply(params, x))


@partial(jax.jit, static_argnums=(0, 3))
def _encode_depth(module: Classifier, params: Params, x: jax.Array, depth: int) -> jax.Array:
    return cast(jax.Array, module.apply(params, x, depth, method=Classifier.encode))


@partial(jax.jit, static_argnums=0)
def _encode_layers(modules: tuple[Autoencoder, ...], params: tuple, x: jax.Array) -> jax.Array:
    for module, p in zip(modules, params, strict=True):
        x = cast(jax.Array, module.apply(p, x, method=Autoencoder.encode))
    return x


@partial(jax.jit, static_argnums=0)
def _reconstruct(modules: tuple[Autoencoder, ...], params: tuple, x: jax.Array) -> jax.Array:
    h = _encode_layers(modules, params, x)
    for module, p in reversed(list(zip(modules, params, strict=True))):
        h = module.apply(p, h, method=Autoencoder.decode)
    return h


def load_model(workdir: str | os.PathLike[str]) -> TrainedModel:
    """The stack saved in ``workdir``: the fine-tuned classifier (``predict``,
    ``encode``) and the pretrained autoencoders (``encoder``, ``reconstruct``), as far
    as the run got (a run of data without labels has no classifier).

    ``workdir`` is relative to the current directory (``~`` expanded).

    Raises:
      CheckpointError: ``workdir`` holds no finished stage to use, or a file of it is
        damaged (the message names the file).
    """
    workdir = user_path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{workdir}: no finished run here (no config.json)")
    saved = read_config(config_path)
    config = config_from_json(saved)
    params = None
    if (workdir / "frozen" / "finetune").exists():
        params = _load_frozen(workdir, "finetune", classifier(config), config.input_features)
    pretrained, in_features = [], config.input_features
    for i, layer in enumerate(config.layers):
        if not (workdir / "frozen" / f"pretrain_{i + 1}").exists():
            break
        module = autoencoder(layer, in_features, config.bias_init, **config_numerics(config))
        pretrained.append(
            FrozenLayer(module, _load_frozen(workdir, f"pretrain_{i + 1}", module, in_features))
        )
        in_features = layer.features
    if params is None and not pretrained:
        raise CheckpointError(
            f"{workdir}: no finished run here (no frozen/finetune or frozen/pretrain_1 checkpoint)"
        )
    stats = None
    if saved.get(RUN_KEY, {}).get("data", {}).get("standardize"):
        stats = _standardization(workdir / STANDARDIZATION, config.input_features)
    return TrainedModel(config, params, tuple(pretrained), stats)


def _load_frozen(workdir: Path, stage: str, module: Any, in_features: int) -> Params:
    """The params saved in ``frozen/<stage>``, checked against their manifest."""
    directory = workdir / "frozen" / stage
    step_dir = directory / "0"
    problem = manifest_problem(workdir, step_dir)
    if problem is not None:
        raise CheckpointError(f"{step_dir}: the saved model is damaged ({problem})")
    template = init_params(module, jax.random.PRNGKey(0), in_features)
    manager = checkpoint_manager(directory, None)
    try:
        params, _ = restore_intact(manager, 0, template, step_dir)
    finally:
        manager.close()
    return params


def _standardization(path: Path, features: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mean, std)`` a run standardized its data with, each ``[features]``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mean, std = f["mean"], f["std"]
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the run's standardization ({e})") from None
    if mean.shape != (features,) or std.shape != (features,) or not (std > 0).all():
        raise CheckpointError(f"{path}: not a standardization of {features} features")
    return mean, std
