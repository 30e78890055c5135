"""Input corruption for denoising autoencoders (Vincent et al., 2010).

Pure functions of an explicit PRNG key and an array; this module imports only
``jax``. Each returns an array of ``x``'s shape and dtype. In bfloat16 and float16
the result is the float32 one rounded to ``x``'s dtype: the same entries are
destroyed, and noise and scales are drawn and applied in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "dropout",
    "gaussian_noise",
    "masking_noise",
    "salt_and_pepper",
]


def _floating(x: ArrayLike, name: str) -> jax.Array:
    """``x`` as an array, refused (``ValueError``) unless its dtype is floating point."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name}: x must have a floating-point dtype (float32, bfloat16, float16, ...), "
            f"got {x.dtype}; scale integer images to [0, 1] first"
        )
    return x


def masking_noise(key: jax.Array, x: ArrayLike, rate: ArrayLike) -> jax.Array:
    """Set a random fraction ``rate`` of the entries of ``x`` to 0.

    Each entry is destroyed independently with probability ``rate``. The surviving
    entries are NOT rescaled by ``1 / (1 - rate)`` (unlike dropout), as in the
    denoising autoencoders of Vincent et al. (2010).

    Args:
      key: a PRNG key.
      x: ``[..., features]``.
      rate: probability in ``[0, 1]`` that an entry is set to 0.

    Returns:
      ``[..., features]``, the corrupted copy.
    """
    x = jnp.asarray(x)
    keep = jax.random.uniform(key, x.shape) >= rate
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def dropout(key: jax.Array, x: ArrayLike, keep: ArrayLike) -> jax.Array:
    """Inverted dropout (Srivastava et al., 2014): keep each entry of ``x`` with
    probability ``keep`` and scale the kept ones by ``1 / keep``, so that the
    expected value of every entry is unchanged and nothing is rescaled at test time.

    Args:
      key: a PRNG key.
      x: ``[..., features]``, floating point.
      keep: probability in ``(0, 1]`` (may be traced); 1 returns ``x`` unchanged.

    Returns:
      ``[..., features]``.
    """
    x = _floating(x, "dropout")
    kept = jax.random.uniform(key, x.shape) < keep
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.where(kept, wide / keep, jnp.zeros((), wide.dtype)).astype(x.dtype)


def gaussian_noise(key: jax.Array, x: ArrayLike, stddev: ArrayLike) -> jax.Array:
    """Add isotropic Gaussian noise: ``x + stddev * N(0, 1)``.

    Args:
      key: a PRNG key.
      x: ``[..., features]``, floating point.
      stddev: non-negative standard deviation.

    Returns:
      ``[..., features]``, the corrupted copy.
    """
    x = _floating(x, "gaussian_noise")
    wide = jnp.promote_types(x.dtype, jnp.float32)
    noise = jnp.asarray(stddev, wide) * jax.random.normal(key, x.shape, wide)
    return (x.astype(wide) + noise).astype(x.dtype)


def salt_and_pepper(
    key: jax.Array, x: ArrayLike, rate: ArrayLike, low: float = 0.0, high: float = 1.0
) -> jax.Array:
    """Set a random fraction ``rate`` of the entries to ``low`` or ``high``.

    Each entry is destroyed independently with probability ``rate``; a destroyed
    entry becomes ``low`` or ``high`` with equal probability (Vincent et al., 2010,
    with ``low, high`` the minimum and maximum of the input range).

    Args:
      key: a PRNG key.
      x: ``[..., features]``.
      rate: probability in ``[0, 1]`` that an entry is destroyed.
      low: the "pepper" value.
      high: the "salt" value.

    Returns:
      ``[..., features]``, the corrupted copy.
    """
    x = jnp.asarray(x)
    hit_key, salt_key = jax.random.split(key)
    hit = jax.random.uniform(hit_key, x.shape) < rate
    salt = jax.random.bernoulli(salt_key, 0.5, x.shape)
    noise = jnp.where(salt, jnp.asarray(high, x.dtype), jnp.asarray(low, x.dtype))
    return jnp.where(hit, noise, x)


#: The corruptions by name (``masking``, ``gaussian``, ``salt_and_pepper``), each
#: ``(key, x, level) -> array of x's shape``.
CORRUPTIONS: dict[str, Callable[[jax.Array, ArrayLike, ArrayLike], jax.Array]] = {
    "masking": masking_noise,
    "gaussian": gaussian_noise,
    "salt_and_pepper": salt_and_pepper,
}


def corrupt(key: jax.Array, x: ArrayLike, kind: str, level: ArrayLike) -> jax.Array:
    """Apply the corruption named ``kind`` (``"none"`` or a key of ``CORRUPTIONS``).

    Args:
      key: a PRNG key.
      x: ``[..., features]``.
      kind: ``"none"``, ``"masking"``, ``"gaussian"`` or ``"salt_and_pepper"``.
      level: the rate (masking, salt and pepper) or standard deviation (gaussian).

    Returns:
      ``[..., features]``.
    """
    if kind == "none":
        return jnp.asarray(x)
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from none, {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[kind](key, x, level)
