"""Shared test fixtures and paths."""

import gzip
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep the tests' caches (downloads, compiled programs) out of the user's home; the
# scripts the tests start inherit this.
os.environ.setdefault("SAE_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="sae_jax_test_cache_"))

# Every program the tests compile, in this process and in the ones it starts (scripts,
# notebook kernels, ``python -c``), goes through one compilation cache in that folder,
# as the scripts' own programs do by default: the same small pipeline is compiled once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["SAE_JAX_CACHE_DIR"], "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# XLA's CPU backend compiles the tests' programs without its LLVM optimisations: the
# programs compute the same, and the suite's many small programs compile in about 3/4
# of the time (a run as users start it, and the benchmarks, compile as usual). And
# each process runs them on one thread: two test workers on two cores, each with a
# thread pool of two, spent a quarter of their time contending (tests/training: 74 s
# against 55 s). The scripts the tests start inherit both; several fake CPU devices
# come on top (xla_flags).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a process of the tests with ``devices`` fake CPU devices."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


REPO = Path(__file__).resolve().parents[1]

# The test files that take minutes, the longest first (``--durations`` on 2 cores).
# The test command's workers (``-n 2 --dist loadfile``) take files in this order, then
# the rest in the order collected, so that the two finish together; by default xdist
# hands out the files with the most tests first, which leaves these few long ones last.
LONG_FIRST = [
    "tests/commands/test_distributed.py",
    "tests/test_readme.py",
    "tests/test_docstrings.py",
    "tests/test_parallel.py",
    "tests/workdir/test_checkpoint.py",
    "tests/training/test_search.py",
    "tests/commands/test_faults.py",
    "tests/commands/test_sweep_equals_runs.py",
    "tests/training/test_data_parallel.py",
    "tests/commands/test_cli.py",
    "tests/test_docs.py",
    "tests/test_device_check.py",
    "tests/training/test_stage.py",
    "tests/training/test_loop.py",
    "tests/training/test_compiles.py",
    "tests/training/test_hparams.py",
    "tests/commands/test_own_data.py",
    "tests/test_benchmark.py",
    "tests/test_wheel.py",
    "tests/training/test_pipeline.py",
    "tests/test_types.py",
    "tests/test_models.py",
]


def pytest_configure(config):
    missing = [path for path in LONG_FIRST if not (REPO / path).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: LONG_FIRST names no such file: {missing}")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --no-loadscope-reorder
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONG_FIRST)}
    where = lambda item: item.nodeid.split("::")[0]
    items.sort(key=lambda item: rank.get(where(item), len(rank)))  # stable: the rest in order


SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir() -> Path:
    """The canonical MNIST IDX files beside the repository (skip when absent)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST files at {SHARED_MNIST}")
    return SHARED_MNIST


# The canonical MNIST file names, spelled out here rather than taken from sae_jax.
MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array) -> bytes:
    """The IDX bytes of a uint8 array, built from the format's definition without
    sae_jax: the magic number 0x000008NN (0x08: unsigned bytes, NN: the number of
    dimensions), each dimension as a big-endian uint32, then the bytes in C order."""
    import numpy as np

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"idx_bytes builds uint8 files only, not {array.dtype}")
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return struct.pack(">I", 0x00000800 | array.ndim) + dims + array.tobytes()


@dataclass(frozen=True)
class SyntheticMnist:
    """Random MNIST-shaped data and its four IDX files, built without sae_jax."""

    arrays: dict  # train_images, train_labels, test_images, test_labels (uint8)
    raw: dict  # file name (no .gz) -> uncompressed IDX bytes
    sha256: dict  # file name -> sha256 of raw: a stand-in for the canonical hashes

    def gz(self) -> dict:
        """The gzipped files: ``<name>.gz`` -> bytes."""
        return {f"{name}.gz": gzip.compress(raw, mtime=0) for name, raw in self.raw.items()}

    def write(self, folder: Path, gz: bool = True) -> Path:
        """Write the four files into ``folder`` (made if missing), gzipped or raw."""
        folder.mkdir(parents=True, exist_ok=True)
        files = self.gz() if gz else self.raw
        for name, body in files.items():
            (folder / name).write_bytes(body)
        return folder


def make_synthetic_mnist(n_train: int = 6, n_test: int = 4, seed: int = 0) -> SyntheticMnist:
    """``n_train`` and ``n_test`` random 28x28 uint8 images with labels in 0..9; the
    test images are all below 128 and the training images all above, so the splits
    cannot be mistaken for each other."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(128, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 128, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    raw = {MNIST_NAMES[key]: idx_bytes(array) for key, array in arrays.items()}
    sha256 = {name: hashlib.sha256(body).hexdigest() for name, body in raw.items()}
    return SyntheticMnist(arrays, raw, sha256)


@pytest.fixture
def synthetic_mnist() -> SyntheticMnist:
    """``make_synthetic_mnist()``: 6 training and 4 test examples."""
    return make_synthetic_mnist()


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed again at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_argv(argv: list[str]) -> list[str]:
    """A documented command line as it runs here: ``python`` is this interpreter and
    ``sae-jax`` the console script installed beside it (as a user's shell finds them)."""
    program = {"python": sys.executable, "sae-jax": str(Path(sys.executable).parent / "sae-jax")}
    return [program.get(argv[0], argv[0]), *argv[1:]]


# The subcommand that each script of experiments/ runs.
SCRIPT_COMMANDS = {
    "mnist": "train",
    "sweep": "sweep",
    "search": "search",
    "encode": "encode",
    "benchmark": "benchmark",
}


def run_script(
    name: str, *flags: str, cwd=REPO, env=None, process: bool = False
) -> subprocess.CompletedProcess:
    """``python experiments/<name>.py`` with ``flags`` as a user would run it, from ``cwd``;
    its status and output.

    It runs in this process (``run_in_process`` of the subcommand that the script runs:
    the same ``main``, flags, defaults and exit statuses; ``tests/commands/test_entry.py``
    holds the three entries equal), unless ``process`` is set or ``env`` (an
    environment) is given: then the script itself runs, as a process of its own."""
    if not process and env is None:
        return run_in_process([SCRIPT_COMMANDS[name], *flags], cwd=cwd)
    script = REPO / "experiments" / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script), *flags],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


# The JAX settings that a command may change (``commands.prepare``).
JAX_SETTINGS = (
    "jax_platforms",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


def run_in_process(argv: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    """``sae-jax *argv`` run in this process as the console script runs it
    (``sae_jax.cli.main.main``), from ``cwd``: its status and what it printed on stdout
    and stderr. Cheaper than a process (no interpreter to start, no JAX to import, the
    compiled programs stay in memory). Its stderr holds what the command printed and
    what the libraries wrote on the process's stderr meanwhile; the working directory,
    SIGTERM's handler, the loggers and the JAX settings that a command changes are put
    back afterwards."""
    import contextlib
    import io
    import logging
    import signal

    import jax

    from sae_jax.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    handler, here = signal.getsignal(signal.SIGTERM), os.getcwd()
    levels = {name: logging.getLogger(name).level for name in ("absl", "asyncio")}
    settings = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    native = tempfile.TemporaryFile()  # noqa: SIM115 (closed below): C++ writes on fd 2
    fd2 = os.dup(2)
    try:
        os.chdir(cwd)
        os.dup2(native.fileno(), 2)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(argv))
            except SystemExit as e:  # argparse: --help, or a bad flag (status 2)
                status = e.code if isinstance(e.code, int) else 1
    finally:
        os.dup2(fd2, 2)
        os.close(fd2)
        native.seek(0)
        err.write(native.read().decode(errors="replace"))
        native.close()
        os.chdir(here)
        signal.signal(signal.SIGTERM, handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in settings.items():
            jax.config.update(name, value)
    return subprocess.CompletedProcess(["sae-jax", *argv], status, out.getvalue(), err.getvalue())


# What a copy of the repository leaves out.
COPY_LEFT_OUT = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    ".dev",
    "_build",
    ".mypy_cache",
    "dist",
)
COPY_IGNORE = shutil.ignore_patterns(*COPY_LEFT_OUT)


def docstring_commands(path: Path) -> list[list[str]]:
    """The ``sae-jax ...`` and ``python ...`` command lines printed in the docstring of
    the module at ``path`` (continuations joined, comments dropped)."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = [line.strip() for line in doc.replace("\\\n", " ").splitlines()]
    return [shlex.split(x, comments=True) for x in lines if x.startswith(("sae-jax ", "python "))]


@pytest.fixture
def clone(tmp_path):
    """A copy of the working tree at ``tmp/main`` (its checkpoints/ emptied), with
    ``tmp/shared`` pointing at the real ../shared."""
    root = tmp_path / "main"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    shutil.rmtree(root / "checkpoints")
    (root / "checkpoints").mkdir()
    if (REPO.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    return root
