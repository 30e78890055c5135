"""Shared test fixtures and paths."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Keep the tests' caches (downloads, compiled programs) out of the user's home; the
# scripts the tests start inherit this.
os.environ.setdefault("SAE_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="sae_jax_test_cache_"))

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir() -> Path:
    """The canonical MNIST IDX files beside the repository (skip when absent)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST files at {SHARED_MNIST}")
    return SHARED_MNIST


def synthetic_digits(n: int, seed: int, features: int = 64, classes: int = 4):
    """uint8 images ``[n, features]`` and labels ``[n]``: one random binary prototype
    per class (the same for every seed), with 10% of the pixels flipped."""
    import numpy as np

    protos = np.random.default_rng(0).random((classes, features)) < 0.3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    flip = rng.random((n, features)) < 0.1
    return ((protos[y] ^ flip) * 255).astype(np.uint8), y.astype(np.uint8)


def synthetic_config(**changes):
    """The ``tiny`` preset sized for ``synthetic_digits`` (64 pixels, 4 classes, every
    example used), with ``changes`` applied."""
    from sae_jax.config import tiny

    return tiny().replace(
        input_features=64, num_classes=4, train_examples=None, test_examples=None, **changes
    )


def run_script(name: str, *flags: str, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    """Run ``experiments/<name>.py`` with ``flags`` as a user would, from ``cwd`` with
    the environment ``env`` (default: this one); capture its output."""
    script = REPO / "experiments" / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script), *flags],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
