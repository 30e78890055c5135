"""The pure layers import nothing heavy; the package's public face resolves."""

import json
import subprocess
import sys

import sae_jax

# What ``import jax`` brings along: its dependencies, and the optional packages it
# imports when installed (etils.epath, pygments for its debugger, typing_extensions
# for its MLIR bindings, zstandard and filelock for its compilation cache).
JAX_IMPORTS = {
    "jax",
    "jaxlib",
    "numpy",
    "ml_dtypes",
    "opt_einsum",
    "scipy",
    "etils",
    "pygments",
    "typing_extensions",
    "zstandard",
    "filelock",
}


def test_losses_and_corruption_import_only_jax():
    # Everything imported beyond the standard library must be on the list above.
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import sae_jax.losses, sae_jax.corruption\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)
    own = {m for m in new if m.startswith("sae_jax.")}
    assert own == {"sae_jax.losses", "sae_jax.corruption"}
    others = {m.partition(".")[0] for m in new if m != "sae_jax" and m not in own}
    not_allowed = {
        m
        for m in others - set(sys.stdlib_module_names) - JAX_IMPORTS
        # made by the interpreter and by Cython-compiled modules, not imported from disk
        if not m.startswith(("_sysconfigdata_", "_cython_")) and m != "cython_runtime"
    }
    assert not not_allowed, f"sae_jax.losses or .corruption imports {sorted(not_allowed)}"
    assert "jax" in others


def test_public_names_resolve():
    for name in sae_jax.__all__:
        assert getattr(sae_jax, name) is not None


def test_importing_the_package_starts_no_backend():
    # --platform and --distributed must take effect before a backend starts.
    code = (
        "import sae_jax.commands.train, sae_jax.workdir.checkpoint, sae_jax.commands.flags\n"
        "import sae_jax.parallel\n"
        "from jax._src import xla_bridge\n"
        "raise SystemExit(1 if xla_bridge._backends else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
