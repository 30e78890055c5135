"""The wheel works outside the repository: ``python -m build`` makes a wheel and an
sdist of a copy of the tree; the wheel is installed into a fresh virtual environment,
and from an empty folder ``sae-jax train --config=tiny`` trains, resumes, evaluates, and
``load_model`` reads what it left, with the default workdir relative to that folder.

The fresh environment gets the wheel by ``pip install --no-deps`` and its dependencies
by a ``.pth`` line naming this environment's site-packages (whose own ``.pth`` files,
the editable install of the repository among them, are not read from there): a full
download of jax and the rest takes minutes. The test checks instead that every
dependency the wheel's metadata asks for is present at a version it allows."""

import email
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import COPY_LEFT_OUT, REPO
from packaging.requirements import Requirement

import sae_jax

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

# and a user's build/ and checkpoints/
COPY_IGNORE = shutil.ignore_patterns(*COPY_LEFT_OUT, "build", "checkpoints")


# The environment of a user outside the repository: no PYTHONPATH (a sae_jax found
# there would make pip take the wheel as installed already), no active venv.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(argv: list, cwd: Path, env: dict = USER_ENV) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``dist/`` of ``python -m build`` run on a copy of the tree (the repository itself
    is left as it is)."""
    tmp = tmp_path_factory.mktemp("build")
    shutil.copytree(REPO, tmp / "src", ignore=COPY_IGNORE)
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", "."],
        tmp / "src",
    )
    return tmp / "dist"


def test_the_wheel_carries_the_package_the_sample_its_types_and_the_command(built):
    (wheel,) = built.glob("sae_jax-*.whl")
    (sdist,) = built.glob("sae_jax-*.tar.gz")
    assert wheel.name == f"sae_jax-{sae_jax.__version__}-py3-none-any.whl"
    assert sdist.name == f"sae_jax-{sae_jax.__version__}.tar.gz"
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("_data/mnist_sample.npz", "py.typed", "__main__.py", "cli/main.py", "losses.py"):
        assert f"sae_jax/{name}" in names, name
    assert {n.split("/")[0] for n in names} == {
        "sae_jax",
        f"sae_jax-{sae_jax.__version__}.dist-info",
    }
    info = f"sae_jax-{sae_jax.__version__}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "sae-jax = sae_jax.cli.main:main" in entry_points
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{info}/METADATA"))
    assert meta["Version"] == sae_jax.__version__ and meta["Name"] == "sae-jax"
    top = f"sae_jax-{sae_jax.__version__}"
    with tarfile.open(sdist) as tar:
        in_sdist = set(tar.getnames())
    assert {f"{top}/{f}" for f in ("CHANGELOG.md", "CITATION.cff", "sae_jax/py.typed")} <= in_sdist


def test_the_citation_names_this_version():
    citation = (REPO / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", citation, re.M)
    assert re.search(rf"^version: {re.escape(sae_jax.__version__)}$", citation, re.M)


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A virtual environment at ``tmp/venv`` with ``wheel`` installed; its ``bin``."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], tmp
    )
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp)
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib.stdout.strip()) / "_dependencies.pth").write_text("\n".join(ours) + "\n")
    return venv / "bin"


def _dependencies_present(wheel: Path) -> None:
    info = f"sae_jax-{sae_jax.__version__}.dist-info/METADATA"
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(info))
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            assert req.specifier.contains(metadata.version(req.name), prereleases=True), line


def test_the_wheel_trains_resumes_and_loads_from_an_empty_folder(built, tmp_path):
    (wheel,) = built.glob("sae_jax-*.whl")
    _dependencies_present(wheel)
    bin_ = _fresh_venv(tmp_path, wheel)
    user = tmp_path / "user"
    user.mkdir()
    env = dict(USER_ENV)
    env["PATH"] = f"{bin_}{os.pathsep}{env['PATH']}"
    where = _run(["python", "-c", "import sae_jax; print(sae_jax.__file__)"], user, env)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout
    first = _run(["sae-jax", "train", "--config=tiny"], user, env)
    again = _run(["sae-jax", "train", "--config=tiny"], user, env)
    assert "finished in an earlier run" not in first.stdout
    assert "finished in an earlier run" in again.stdout
    summary = json.loads((user / "checkpoints" / "mnist" / "summary.json").read_text())
    evaluated = _run(["sae-jax", "train", "--eval_only"], user, env)
    assert f"test_accuracy {summary['test_accuracy']:.4f}" in evaluated.stdout
    loaded = _run(
        [
            "python",
            "-c",
            "import sae_jax\n"
            "model = sae_jax.load_model('checkpoints/mnist')\n"
            "images = sae_jax.load_mnist('sample').test_images[:8]\n"
            "print(model.predict(images).shape, model.encode(images, depth=1).shape)",
        ],
        user,
        env,
    )
    assert loaded.stdout.splitlines()[-1] == "(8, 10) (8, 64)"
    assert sorted(p.name for p in user.iterdir()) == ["checkpoints"]
