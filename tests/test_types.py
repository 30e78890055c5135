"""The package passes mypy as pyproject.toml configures it: all of ``sae_jax``, and the
flags of ``--strict`` on ``sae_jax.losses``, ``sae_jax.corruption`` and ``sae_jax.models``."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

ROOT = Path(__file__).resolve().parents[1]


def test_package_passes_mypy(tmp_path):
    # A cache of its own: nothing is written into the repository, and every run is cold.
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mypy found errors:\n{output}"
    # A strict override whose module no longer exists (renamed) would check nothing.
    unused = [line for line in output.splitlines() if "unused section" in line]
    assert not any("sae_jax" in line for line in unused), output
