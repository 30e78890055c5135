"""The pure layers import nothing heavy; the package's public face resolves."""

import subprocess
import sys

import sae_jax


def test_losses_and_corruption_import_only_jax():
    code = (
        "import sys, sae_jax.losses, sae_jax.corruption\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules}"
        " & {'flax', 'orbax', 'tensorflow_datasets', 'tensorflow', 'optax'})\n"
        "own = sorted(m for m in sys.modules if m.startswith('sae_jax.')"
        " and m not in ('sae_jax.losses', 'sae_jax.corruption'))\n"
        "print(heavy, own)\n"
        "sys.exit(1 if heavy or own else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names_resolve():
    for name in sae_jax.__all__:
        assert getattr(sae_jax, name) is not None


def test_importing_the_package_starts_no_backend():
    # --platform and --distributed must take effect before a backend starts.
    code = (
        "import sae_jax.experiment, sae_jax.checkpoint, sae_jax.cli, sae_jax.parallel\n"
        "from jax._src import xla_bridge\n"
        "raise SystemExit(1 if xla_bridge._backends else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
