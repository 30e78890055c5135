"""Configuration: frozen dataclasses and their validation (the named presets are in
``sae_jax.config.presets``).

``Config.validate`` refuses bad values with a ``ConfigError`` whose message names
the field, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sae_jax.errors import ConfigError

ACTIVATIONS = ("sigmoid", "relu", "linear")
DECODER_ACTIVATIONS = ("sigmoid", "linear")
RECONSTRUCTIONS = ("squared_error", "cross_entropy")
REDUCTIONS = ("sum", "mean")
NOISES = ("none", "masking", "gaussian", "salt_and_pepper")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
BIAS_INITS = ("uniform", "zeros")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer.

    ``rmsprop`` follows TensorFlow 1's ``RMSPropOptimizer``: the mean square starts at
    1, ``eps`` is added inside the square root, and ``momentum`` is 0 by default.
    Schedules count epochs (see ``sae_jax.training.optim.make_optimizer``); ``max_norm`` keeps
    the incoming weights of every unit within an L2 ball (Srivastava et al., 2014).
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    decay: float = 0.9  # rmsprop only
    momentum: float = 0.0  # rmsprop and sgd
    eps: float = 1e-8
    lr_decay: float = 1.0  # the learning rate is multiplied by this after every epoch
    momentum_start: float | None = None  # rises linearly from here to momentum ...
    momentum_epochs: int = 0  # ... over this many epochs
    max_norm: float | None = None  # the norm limit of each unit's incoming weights


@dataclass(frozen=True)
class LayerConfig:
    """One autoencoder layer of the stack and how it is pretrained.

    The layer maps ``[batch, in]`` to ``[batch, features]`` and back. Its loss is
    ``reduce(reconstruction) + beta * KL + l1 * reduce(|h|)
    + contractive * reduce(||J||^2) + weight_decay * sum(W^2) / 2``,
    where ``reduce`` is the sum or mean over the batch. ``noise`` corrupts the input
    at ``noise_level`` (a rate, or gaussian's standard deviation); a level of 0 is no
    corruption, whatever the kind, so a search over levels may include it.
    """

    features: int
    activation: str = "sigmoid"
    decoder_activation: str = "sigmoid"
    tied: bool = False
    top_k: int | None = None
    reconstruction: str = "squared_error"
    batch_reduction: str = "sum"
    reconstruction_scale: float = 1.0  # 0.5 gives UFLDL's (1/2)||x' - x||^2
    rho: float = 0.05
    beta: float = 0.0
    l1: float = 0.0
    contractive: float = 0.0
    weight_decay: float = 0.0
    noise: str = "none"
    noise_level: float = 0.0
    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass(frozen=True)
class Config:
    """A whole stacked-autoencoder experiment.

    Stages: one pretraining stage per entry of ``layers``, a softmax-only stage on
    the top code (``softmax_epochs``, may be 0), and end-to-end fine-tuning.
    ``train_examples`` / ``test_examples`` keep only the first N examples (None: all).
    ``validation_examples`` holds out the last N training examples: the softmax and
    fine-tuning stages are then judged on them after every epoch, each keeps its
    best epoch's params, fine-tuning stops after ``finetune_patience`` epochs
    without improvement (None: never), and the test set is used once, at the end.
    ``finetune_input_keep`` / ``finetune_hidden_keep`` below 1 fine-tune with dropout
    (Srivastava et al., 2014): each input / hidden unit is kept with that probability
    and scaled by its inverse during training, and the whole network is evaluated.

    Precision, as Flax modules take it: ``dtype`` is the computation's (the matmuls
    and activations; bfloat16 suits TPUs and recent GPUs), ``param_dtype`` the
    params' and so the optimizer state's (float32: a full-precision master copy that
    every update is applied to), and ``matmul_precision`` XLA's precision of the
    matmuls (``default``: the backend's fastest, bfloat16 passes on a TPU, TF32 on
    an NVIDIA GPU; ``high``; ``highest``: full float32). The losses sum and average
    in float32 whatever ``dtype`` is (see ``sae_jax.losses``).
    """

    name: str
    layers: tuple[LayerConfig, ...]
    input_features: int = 784
    num_classes: int = 10
    batch_size: int = 160
    bias_init: str = "uniform"
    softmax_epochs: int = 0
    softmax_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    softmax_weight_decay: float = 0.0
    finetune_epochs: int = 10
    finetune_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    finetune_weight_decay: float = 0.0
    finetune_input_keep: float = 1.0
    finetune_hidden_keep: float = 1.0
    eval_batch_size: int = 1000
    train_examples: int | None = None
    test_examples: int | None = None
    validation_examples: int = 0
    finetune_patience: int | None = None
    seed: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    matmul_precision: str = "default"

    @property
    def layer_sizes(self) -> list[int]:
        """Widths from the input up, ``[input_features, features of each layer...]``."""
        return [self.input_features, *(layer.features for layer in self.layers)]

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def with_epochs(self, epochs: int) -> Config:
        """Override every stage's epochs; a stage the preset skips (0 epochs) stays skipped."""
        if epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {epochs}")
        layers = tuple(dataclasses.replace(layer, epochs=epochs) for layer in self.layers)
        return self.replace(
            layers=layers,
            softmax_epochs=epochs if self.softmax_epochs > 0 else 0,
            finetune_epochs=epochs,
        )

    def validate(self, num_train: int | None = None) -> Config:
        """Check every value; raise ``ConfigError`` naming the first bad one.

        Args:
          num_train: the number of training examples, to check ``batch_size``.

        Returns:
          ``self``, so calls can be chained.
        """
        if not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            raise ConfigError(f"seed must be an integer in [0, {2**32}), got {self.seed!r}")
        _positive_int("input_features", self.input_features)
        _positive_int("num_classes", self.num_classes)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _non_negative_int("softmax_epochs", self.softmax_epochs)
        _non_negative_int("finetune_epochs", self.finetune_epochs)
        _non_negative_int("validation_examples", self.validation_examples)
        if self.finetune_patience is not None:
            _positive_int("finetune_patience", self.finetune_patience)
        _non_negative("softmax_weight_decay", self.softmax_weight_decay)
        _non_negative("finetune_weight_decay", self.finetune_weight_decay)
        for name in ("finetune_input_keep", "finetune_hidden_keep"):
            value = getattr(self, name)
            _positive(name, value)
            if value > 1.0:
                raise ConfigError(f"{name} is a probability and must be in (0, 1], got {value!r}")
        _choice("bias_init", self.bias_init, BIAS_INITS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        for name in ("train_examples", "test_examples"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not self.layers:
            raise ConfigError("layers must hold at least one layer")
        _optimizer("softmax_optimizer", self.softmax_optimizer)
        _optimizer("finetune_optimizer", self.finetune_optimizer)
        for i, layer in enumerate(self.layers):
            _layer(f"layers[{i}]", layer)
        n = num_train
        if n is not None and self.train_examples is not None:
            n = min(n, self.train_examples)
        if n is not None and self.validation_examples >= n:
            raise ConfigError(
                f"validation_examples={self.validation_examples} leaves no training "
                f"examples out of {n}"
            )
        if n is not None:
            n -= self.validation_examples
        if n is not None and self.batch_size > n:
            raise ConfigError(
                f"batch_size={self.batch_size} is larger than the {n} training examples"
            )
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def _finite(name: str, value: Any) -> None:
    """Refuse anything but an int or a finite float (inf and nan included)."""
    if not (_is_int(value) or (isinstance(value, float) and math.isfinite(value))):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    _finite(name, value)
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


def _positive(name: str, value: Any) -> None:
    _finite(name, value)
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _optimizer(name: str, opt: OptimizerConfig) -> None:
    _choice(f"{name}.name", opt.name, OPTIMIZERS)
    _positive(f"{name}.learning_rate", opt.learning_rate)
    _positive(f"{name}.eps", opt.eps)
    if not 0.0 <= opt.decay < 1.0:
        raise ConfigError(f"{name}.decay must be in [0, 1), got {opt.decay!r}")
    if not 0.0 <= opt.momentum < 1.0:
        raise ConfigError(f"{name}.momentum must be in [0, 1), got {opt.momentum!r}")
    _positive(f"{name}.lr_decay", opt.lr_decay)
    if opt.lr_decay > 1.0:
        raise ConfigError(f"{name}.lr_decay must be in (0, 1], got {opt.lr_decay!r}")
    if opt.max_norm is not None:
        _positive(f"{name}.max_norm", opt.max_norm)
    if opt.momentum_start is not None:
        if opt.name == "adam":
            raise ConfigError(f"{name}.momentum_start: adam has no momentum to schedule")
        if not 0.0 <= opt.momentum_start < 1.0:
            raise ConfigError(
                f"{name}.momentum_start must be in [0, 1), got {opt.momentum_start!r}"
            )
        _positive_int(f"{name}.momentum_epochs", opt.momentum_epochs)


def _layer(name: str, layer: LayerConfig) -> None:
    _positive_int(f"{name}.features", layer.features)
    _non_negative_int(f"{name}.epochs", layer.epochs)
    _choice(f"{name}.activation", layer.activation, ACTIVATIONS)
    _choice(f"{name}.decoder_activation", layer.decoder_activation, DECODER_ACTIVATIONS)
    _choice(f"{name}.reconstruction", layer.reconstruction, RECONSTRUCTIONS)
    _choice(f"{name}.batch_reduction", layer.batch_reduction, REDUCTIONS)
    _choice(f"{name}.noise", layer.noise, NOISES)
    _positive(f"{name}.reconstruction_scale", layer.reconstruction_scale)
    for term in ("beta", "l1", "contractive", "weight_decay"):
        _non_negative(f"{name}.{term}", getattr(layer, term))
    if not (isinstance(layer.rho, (int, float)) and 0.0 < layer.rho < 1.0):
        raise ConfigError(f"{name}.rho must be in (0, 1), got {layer.rho!r}")
    if layer.top_k is not None:
        _positive_int(f"{name}.top_k", layer.top_k)
        if layer.top_k > layer.features:
            raise ConfigError(
                f"{name}.top_k={layer.top_k} is larger than features={layer.features}"
            )
    if (layer.beta > 0 or layer.contractive > 0) and layer.activation != "sigmoid":
        raise ConfigError(
            f"{name}: the KL sparsity and contractive penalties need sigmoid units, "
            f"got activation={layer.activation!r}"
        )
    if layer.reconstruction == "cross_entropy" and layer.decoder_activation != "sigmoid":
        raise ConfigError(f"{name}: reconstruction='cross_entropy' needs a sigmoid decoder")
    _non_negative(f"{name}.noise_level", layer.noise_level)
    if layer.noise == "none" and layer.noise_level != 0:
        raise ConfigError(
            f"{name}.noise_level={layer.noise_level!r} changes nothing with noise='none': "
            f"set {name}.noise (masking, gaussian or salt_and_pepper), or a level of 0"
        )
    if layer.noise in ("masking", "salt_and_pepper") and layer.noise_level >= 1.0:
        raise ConfigError(
            f"{name}.noise_level is a rate and must be in [0, 1), got {layer.noise_level!r}"
        )
    _optimizer(f"{name}.optimizer", layer.optimizer)
