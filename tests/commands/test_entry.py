"""``sae-jax`` and ``python -m sae_jax``: the subcommands, ``--help`` and ``--version``,
the one-line errors, and the scripts of ``experiments/`` as the same commands."""

import inspect
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_MNIST, command_argv

import sae_jax
from sae_jax.cli import train
from sae_jax.cli.main import SUBCOMMANDS, main
from sae_jax.config.presets import PRESETS

# subcommand: the script of experiments/ that is the same command
SCRIPTS = {
    "train": "mnist",
    "sweep": "sweep",
    "search": "search",
    "encode": "encode",
    "benchmark": "benchmark",
}


def _run(argv: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_every_script_of_experiments_is_a_subcommand():
    assert set(SUBCOMMANDS) == set(SCRIPTS)
    assert {f"{s}.py" for s in SCRIPTS.values()} <= {
        p.name for p in (REPO / "experiments").glob("*.py")
    }


def test_help_lists_the_subcommands_and_version_prints_the_package_version():
    shown = _run(command_argv(["sae-jax", "--help"]))
    assert shown.returncode == 0 and shown.stderr == ""
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in shown.stdout
    version = _run([sys.executable, "-m", "sae_jax", "--version"])
    assert version.returncode == 0 and version.stdout == f"sae-jax {sae_jax.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "named"),
    [([], "name a subcommand"), (["tran", "--config=tiny"], "unknown subcommand 'tran'")],
)
def test_a_missing_or_unknown_subcommand_is_one_line_and_status_2(argv, named):
    proc = _run(command_argv(["sae-jax", *argv]))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_subcommand_has_the_flags_and_defaults_of_its_script(name, capsys):
    """``sae-jax NAME --help`` says what ``python experiments/SCRIPT.py --help`` says,
    in the subcommand's name (run in process, through ``main``)."""
    script = _run([sys.executable, f"experiments/{SCRIPTS[name]}.py", "--help"])
    assert script.returncode == 0
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: sae-jax {name} [-h]")
    flags = lambda text: sorted({w for w in text.split() if w.startswith("--")})
    assert flags(shown) == flags(script.stdout) and "--platform" in flags(shown)
    # the same text, once the usage lines are set aside (they wrap by the program's name)
    body = lambda text: text[text.index("\n\n") :]
    assert body(shown) == body(script.stdout)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--config=tiny", "--checkpoint_every=-1"], "--checkpoint_every"),
        (["sweep", "--config=tiny", "--seeds=two"], "--seeds"),
        (["search", "--config=tiny", "--points=two"], "--points"),
        (["encode", "--depth=top"], "--depth"),
        (["benchmark", "--config=huge"], "--config=huge"),
    ],
)
def test_a_bad_flag_is_the_same_line_and_status_through_every_entry(argv, named, tmp_path):
    name, *flags = argv
    seen = [
        _run(command_argv(["sae-jax", *argv]), cwd=tmp_path),
        _run([sys.executable, "-m", "sae_jax", *argv], cwd=tmp_path),
        _run([sys.executable, str(REPO / "experiments" / f"{SCRIPTS[name]}.py"), *flags], tmp_path),
    ]
    for proc in seen:
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert len({proc.stderr for proc in seen}) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_presets_run_line_is_a_train_command_of_that_preset(name):
    """The ``Run:`` line of each preset's docstring parses with ``sae-jax train``'s
    flags, names its preset and reads data that exist beside the repository."""
    doc = " ".join(inspect.getdoc(PRESETS[name]).split())
    line = re.search(r"Run: ``(sae-jax train [^`]*)``", doc).group(1)
    flags = train.parser().parse_args(shlex.split(line)[2:])
    assert flags.config == name
    if flags.data_dir and SHARED_MNIST.is_dir():
        assert (REPO / flags.data_dir).resolve() == SHARED_MNIST.resolve()
