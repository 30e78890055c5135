"""experiments/mnist.py when things go wrong: relative and ~ paths, a busy workdir, full
disks and file-size limits, unusable workdirs, damaged run files, SIGTERM and Ctrl-C.
Every one ends with one line on stderr, no traceback, and a run that can go on."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TEST_XLA_FLAGS, run_in_process, run_script

from sae_jax.config import tiny
from sae_jax.data import load_sample
from sae_jax.errors import CheckpointError
from sae_jax.files import WorkdirLock, file_manifest
from sae_jax.inference import load_model
from sae_jax.workdir.checkpoint import RunStore
from sae_jax.workdir.saving import Saver

SCRIPT = str(REPO / "experiments" / "mnist.py")
TINY = ["--config=tiny", "--epochs=1", "--no_figures", "--checkpoint_every=0"]  # every epoch


def _mnist(*flags, cwd=REPO, env=None, shell_prefix="", process=False):
    """Run experiments/mnist.py (in this process unless ``process``, see ``run_script``);
    ``shell_prefix`` (e.g. a ulimit) runs in bash first, in a process of its own."""
    if not shell_prefix:
        return run_script("mnist", *flags, cwd=cwd, env=env, process=process)
    argv = [sys.executable, SCRIPT, *flags]
    if shell_prefix:
        argv = ["bash", "-c", f'{shell_prefix} && exec "$0" "$@"', *argv]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _one_line(proc, status: int) -> str:
    """The single stderr line of a run that ended with ``status``."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (1 epoch a stage, relative --workdir from its parent folder)."""
    top = tmp_path_factory.mktemp("finished")
    proc = _mnist(*TINY, "--workdir=run", cwd=top, process=True)  # its command line
    assert proc.returncode == 0, proc.stderr
    return top / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run, to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_relative_and_home_paths_work_and_resume(finished, tmp_path):
    # The fixture ran with --workdir=run from its folder; a rerun from there resumes.
    rerun = _mnist(*TINY, "--workdir=run", cwd=finished.parent, process=True)  # summary.json
    assert rerun.returncode == 0, rerun.stderr
    assert "finetune: finished in an earlier run" in rerun.stdout
    assert "damaged" not in rerun.stdout and not (finished / "damaged").exists()
    home = dict(os.environ, HOME=str(tmp_path))
    proc = _mnist(*TINY, "--workdir=~/w", "--eval_only", env=home)
    assert "no finished run here" in _one_line(proc, 2) and str(tmp_path / "w") in proc.stderr
    shutil.copytree(finished, tmp_path / "w")
    proc = _mnist("--workdir=~/w", "--eval_only", env=home)
    assert proc.returncode == 0, proc.stderr
    accuracy = json.loads((finished / "summary.json").read_text())["test_accuracy"]
    assert f"{tmp_path}/w: test_accuracy {accuracy:.4f}" in proc.stdout


def test_load_model_takes_a_relative_path(finished, monkeypatch):
    monkeypatch.chdir(finished.parent)
    model = load_model("run")
    images = load_sample().test_images[:4]
    logits = model.predict(images)
    assert logits.shape == (4, 10)
    np.testing.assert_array_equal(logits, load_model(finished).predict(images))


def test_what_a_run_leaves_is_readable_and_traceable(finished):
    for path in [*finished.iterdir(), *(finished / "manifests").rglob("*.json")]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["command"] == f"{sys.executable} {SCRIPT} {' '.join(TINY)} --workdir=run"
    assert set(summary["versions"]) == {
        "python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"
    }  # fmt: skip
    assert all(summary["versions"].values())
    assert summary["data"]["source"] == "bundled sample mnist_sample.npz"
    sample = load_sample()
    expected = {
        "train_images": sample.train_images[:1000].reshape(1000, 784),
        "train_labels": sample.train_labels[:1000],
        "test_images": sample.test_images[:500].reshape(500, 784),
        "test_labels": sample.test_labels[:500],
    }
    for name, array in expected.items():
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        assert summary["data"]["sha256"][name] == digest, name


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
    with WorkdirLock(tmp_path, log=print):
        proc = _mnist(*TINY, f"--workdir={tmp_path}")
    line = _one_line(proc, 2)
    assert line == (
        f"error: --workdir={tmp_path} is in use by pid {os.getpid()} on {os.uname().nodename}; "
        f"wait for that run to end (--wait), or use another --workdir"
    )
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]  # nothing else was written


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--workdir=", "--workdir is empty: name a folder"),
        (
            "--compilation_cache=/proc/sae_jax",
            "--compilation_cache=/proc/sae_jax: cannot create it",
        ),
    ],
)
def test_paths_that_cannot_work_are_refused_before_any_work(tmp_path, flag, message):
    proc = _mnist("--config=tiny", flag, cwd=tmp_path)
    assert _one_line(proc, 2).startswith(f"error: {message}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_workdir_that_cannot_be_a_folder_is_a_user_mistake(tmp_path, where):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "w" if where == "under_a_file" else "/proc/sae_jax_w"
    line = _one_line(_mnist(*TINY, f"--workdir={workdir}"), 2)
    reason = "Not a directory" if where == "under_a_file" else "No such file or directory"
    assert line == f"error: --workdir={workdir}: cannot create it ({reason})"


@pytest.mark.slow
def test_a_file_size_limit_ends_in_one_line_and_the_run_goes_on(tmp_path):
    flags = ["--config=tiny", "--epochs=2", "--no_figures", f"--workdir={tmp_path}"]
    flags.append("--checkpoint_every=0")  # every epoch: with the optimizer state, > 300 kB
    line = _one_line(_mnist(*flags, shell_prefix="ulimit -f 300"), 1)  # 300 kB per file
    assert line.startswith(f"error: cannot save the checkpoint {tmp_path}/")
    assert line.endswith(": File too large")
    proc = _mnist(*flags)
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy" in proc.stdout


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs at ``tmp_path / "disk"`` (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)])
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_keeps_what_was_saved(tmpfs):
    flags = ["--config=tiny", "--epochs=2", "--no_figures", f"--workdir={tmpfs / 'w'}"]
    flags.append("--checkpoint_every=0")  # every epoch, to fill the disk
    line = _one_line(_mnist(*flags), 1)
    assert line.startswith(f"error: cannot save the checkpoint {tmpfs}/w/checkpoints/pretrain_1/")
    assert line.endswith(": No space left on device")
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    proc = _mnist(*flags)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain_1: resuming after epoch" in proc.stdout
    assert "damaged" not in proc.stdout


def test_a_read_only_workdir_is_refused_but_can_be_evaluated(tmpfs, finished):
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    shutil.copytree(finished, tmpfs / "w")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    line = _one_line(_mnist(*TINY, f"--workdir={tmpfs / 'w'}"), 2)
    assert line == f"error: --workdir={tmpfs / 'w'}: cannot write in it (Read-only file system)"
    proc = _mnist("--eval_only", f"--workdir={tmpfs / 'w'}")
    assert proc.returncode == 0 and "test_accuracy" in proc.stdout, proc.stderr


@pytest.mark.parametrize("content", ['{"name": "tin', "[]", '{"name": "tiny"}'])
def test_a_damaged_config_json_is_named(run_copy, content):
    config = run_copy / "config.json"
    config.write_text(content)
    with pytest.raises(CheckpointError, match=f"^{config}: .*; --restart discards the run$"):
        RunStore(run_copy, tiny().with_epochs(1), log=print)
    with pytest.raises(CheckpointError, match=f"^{config}: "):
        load_model(run_copy)


def test_a_damaged_config_json_is_one_line_for_a_rerun_and_eval_only(run_copy):
    config = run_copy / "config.json"
    config.write_text(config.read_text()[:100])  # truncated
    for flags in ([*TINY, f"--workdir={run_copy}"], ["--eval_only", f"--workdir={run_copy}"]):
        line = _one_line(_mnist(*flags), 2)
        assert line.startswith(f"error: {config}: the run's config is damaged (not JSON: "), line


def test_a_damaged_manifest_condemns_only_its_checkpoint(run_copy):
    manifest = run_copy / "manifests" / "frozen" / "finetune" / "0.json"
    manifest.write_text('{"tree/')
    with pytest.raises(CheckpointError, match=r"the manifest is damaged \(not JSON"):
        load_model(run_copy)
    proc = _mnist(*TINY, f"--workdir={run_copy}")
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint {run_copy}/frozen/finetune/0 is damaged" in proc.stdout
    assert "finetune: resuming after epoch 1" in proc.stdout  # its last epoch checkpoint
    assert load_model(run_copy).config.name == "tiny"


def test_an_intact_checkpoint_that_cannot_be_read_is_never_moved(run_copy):
    step = run_copy / "frozen" / "finetune" / "0"
    meta = next(p for p in step.rglob("_METADATA") if "tree" in p.parts)
    meta.write_text("{}")  # orbax can no longer read it, but the manifest matches
    manifest = run_copy / "manifests" / "frozen" / "finetune" / "0.json"
    manifest.write_text(json.dumps(file_manifest(step)))
    with pytest.raises(CheckpointError, match="cannot restore it although its files are intact"):
        load_model(run_copy)
    line = _one_line(_mnist(*TINY, f"--workdir={run_copy}"), 2)
    assert f"{step}: cannot restore it although its files are intact" in line
    assert step.is_dir() and not (run_copy / "damaged").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_in_one_line_and_it_resumes(tmp_path, signum):
    flags = ["--config=tiny", "--epochs=8", "--no_figures", f"--workdir={tmp_path}"]
    # The child starts with SIGINT at its default, as from a terminal, even where the
    # tests run with it ignored: a Python handler here is not inherited, SIG_IGN would be.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    for line in proc.stdout:
        if line.startswith("pretrain_2 epoch   2/8"):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.count("\n") == 1 and "Traceback" not in err + out, err
    assert err.startswith(f"error: stopped by {name} during pretrain_2 (epoch ")
    assert err.rstrip().endswith(f"is saved in {tmp_path}); run the same command again to resume")
    saved = int(err.split("(epoch ")[1].split()[0])
    assert saved >= 2
    resumed = run_script("mnist", *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert f"pretrain_2: resuming after epoch {saved} from" in resumed.stdout


def test_help_speaks_to_users_and_shows_defaults():
    for name in ("mnist", "sweep", "benchmark"):
        text = run_script(name, "--help").stdout
        assert "intentionally" not in text and "This file" not in text
        options = text.split("options:\n")[1].split("\n  -")[1:]
        for option in options:
            if not option.startswith("h, --help"):
                assert "default" in option, f"{name}.py: -{option}"


def test_checkpoints_of_another_config_are_refused_until_restart_discards_them(run_copy):
    (run_copy / "config.json").unlink()
    flags = ["--config=tiny", "--epochs=2", "--no_figures", f"--workdir={run_copy}"]
    line = _one_line(_mnist(*flags), 2)
    assert line.startswith(f"error: {run_copy}/frozen/pretrain_1/0 was saved by a run with ")
    assert "another config (finetune_epochs: 1 -> 2;" in line
    assert not (run_copy / "damaged").exists()
    (run_copy / "notes.txt").write_text("mine")
    proc = _mnist(*flags, "--restart")  # trains from scratch: nothing is resumed
    assert proc.returncode == 0, proc.stderr
    assert "earlier run" not in proc.stdout and "resuming" not in proc.stdout
    assert "pretrain_1 epoch   1/2" in proc.stdout
    metrics = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    stages = ("pretrain_1", "pretrain_2", "softmax", "finetune")
    assert [(m["stage"], m["epoch"]) for m in metrics] == [(s, e) for s in stages for e in (1, 2)]
    assert json.loads((run_copy / "config.json").read_text())["finetune_epochs"] == 2
    assert (run_copy / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_a_nan_loss_ends_in_one_line_with_status_1(tmp_path):
    # Adam's first step moves every weight by about the learning rate: 1e38 overflows.
    flags = ["--config=tiny", "--epochs=1", "--no_pretraining", "--finetune_lr=1e38"]
    line = _one_line(_mnist(*flags, f"--workdir={tmp_path}"), 1)
    assert line == "error: stage finetune, epoch 1: the loss became nan"
    assert not (tmp_path / "summary.json").exists()


# SIGTERM while XLA compiles: a timer thread sends it 50 ms into the second compilation
# (of a cold cache), so that the handler runs as the compiler returns, with XLA's
# threads still at work.
SIGTERM_IN_COMPILATION = """
import os, signal, sys, threading
import jax._src.compiler as compiler

compile_or_get_cached, calls = compiler.compile_or_get_cached, []


def compiling(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return compile_or_get_cached(*args, **kwargs)


compiler.compile_or_get_cached = compiling
from sae_jax.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_first_compilation_exits_143_in_one_line(tmp_path):
    # A cold cache and XLA's usual optimisations: compiling takes long enough for the
    # signal to land in it.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(TEST_XLA_FLAGS, "")
    flags = ["--config=tiny", "--epochs=1", "--no_figures", "--compilation_cache=off"]
    argv = [sys.executable, "-c", SIGTERM_IN_COMPILATION, "train", *flags]
    proc = subprocess.run(
        [*argv, f"--workdir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300
    )
    line = _one_line(proc, 128 + signal.SIGTERM)  # not 139: a crash at exit
    assert line.startswith("error: stopped by SIGTERM ") and line.endswith("again to resume")


def _removed_at(monkeypatch, where: str):
    """Remove the workdir of a run once the second epoch of pretrain_2 is done: from the
    training thread, after the saves in flight (``where="epoch"``), or in the saver's
    thread, between orbax's save of that epoch and its manifest (``where="commit"``)."""
    if where == "epoch":
        save_epoch = RunStore.save_epoch

        def removing(store, stage, state, key, record, best=None):
            if (stage, len(record.history)) == ("pretrain_2", 2):
                store._saver.wait()
                shutil.rmtree(store.workdir)
            return save_epoch(store, stage, state, key, record, best)

        monkeypatch.setattr(RunStore, "save_epoch", removing)
    else:
        commit = Saver._commit

        def removing(saver, manager, step_dir):
            if step_dir.parent.name == "pretrain_2" and step_dir.name == "2":
                manager.wait_until_finished()
                shutil.rmtree(saver.workdir)
            return commit(saver, manager, step_dir)

        monkeypatch.setattr(Saver, "_commit", removing)


@pytest.mark.parametrize("where", ["epoch", "commit"])
def test_a_workdir_removed_while_the_run_writes_ends_in_one_line(tmp_path, monkeypatch, where):
    workdir = tmp_path / "run"
    flags = ["train", *TINY[:1], "--epochs=3", *TINY[2:], f"--workdir={workdir}"]
    with monkeypatch.context() as patch:
        _removed_at(patch, where)
        proc = run_in_process(flags)
    line = _one_line(proc, 1)
    assert line == (
        f"error: {workdir}: the folder was removed while the run was writing to it; "
        "nothing more is written there; run the same command again to start over"
    )
    assert not workdir.exists()  # the run made nothing there again
    rerun = run_in_process(flags)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" not in rerun.stdout and "earlier run" not in rerun.stdout


def test_a_disk_full_from_the_start_names_the_file(tmpfs):
    (tmpfs / "fill").write_bytes(b"")
    with open(tmpfs / "fill", "wb") as fill, contextlib.suppress(OSError):
        fill.write(bytes(4 << 20))  # more than the 2 MB disk: it is full
    proc = run_in_process(["train", *TINY, f"--workdir={tmpfs / 'w'}"])
    assert _one_line(proc, 1) == f"error: {tmpfs / 'w' / 'run.lock'}: No space left on device"


def test_a_lock_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "run.lock").mkdir()
    proc = run_in_process(["train", *TINY, f"--workdir={tmp_path}"])
    assert _one_line(proc, 2) == (
        f"error: {tmp_path / 'run.lock'}: is a folder, not the lock file a run keeps there; "
        "move it away or use another --workdir"
    )
    assert (tmp_path / "run.lock").is_dir() and sorted(tmp_path.iterdir()) == [
        tmp_path / "run.lock"
    ]
