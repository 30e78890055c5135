"""Shared test fixtures and paths."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir() -> Path:
    """The canonical MNIST IDX files beside the repository (skip when absent)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST files at {SHARED_MNIST}")
    return SHARED_MNIST
