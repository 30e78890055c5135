"""Runs of several processes joined by ``jax.distributed`` (gloo collectives on CPU),
started here as local processes exactly as on several hosts: a run, its kill and
resume, a sweep whose models are spread over 2 processes x 2 devices, and a lost
process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, free_port, run_script, xla_flags

import sae_jax
from sae_jax.files import WorkdirLock, manifest_problem

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

# tiny's batch of 25 does not divide over 2 devices; 24 does.
FLAGS = ("--config=tiny", "--config.batch_size=24", "--epochs=4", "--data_source=sample")
KILL_AT = "pretrain_2 epoch   2/4"


def launch(script: str, *flags: str, processes: int = 2, devices: int = 1) -> list:
    """``experiments/<script>.py`` (or the Python code ``script``) in ``processes``
    processes joined on a free local port, each with ``devices`` CPU devices; stdout
    and stderr are piped."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    program = ["-c", script] if "\n" in script else [str(REPO / "experiments" / f"{script}.py")]
    command = [sys.executable, *program, "--platform=cpu"]
    command += [
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        "--distributed_timeout=30",
    ]
    return [
        subprocess.Popen(
            [*command, f"--process_id={i}", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for i in range(processes)
    ]


def finish(procs: list, timeout: float = 180) -> list[tuple[int, str, str]]:
    """``(status, stdout, stderr)`` of every process, once all have ended."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def run(script: str, *flags: str, **kw) -> list[tuple[int, str, str]]:
    results = finish(launch(script, *flags, **kw))
    for status, out, err in results:
        assert status == 0, out[-2000:] + err[-3000:]
    return results


def run_until(line_start: str, procs: list, saved: Path | None = None) -> None:
    """Read process 0's output until a line starts with ``line_start`` (and the file
    ``saved`` exists: a checkpoint's manifest), then SIGKILL every process (as a
    scheduler or a lost host would end them)."""
    for line in procs[0].stdout:
        if line.startswith(line_start):
            break
    else:
        pytest.fail(f"no line {line_start!r}: {finish(procs)}")
    while saved is not None and not saved.exists():
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)


# gloo's connection line, in the pieces that its C++ stream writes one by one, so that
# the lines of its threads (one per device) interleave at any of them.
GLOO = (
    r"\[Gloo\] Rank | is connected to | peer ranks\. Expected number of connected peer "
    r"ranks is : |\d+"
)


def quiet(out: str) -> bool:
    """Nothing printed but gloo's own connection lines (from its C++ library)."""
    return not re.sub(GLOO, "", out).strip()


def _leaves(workdir: Path) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(sae_jax.load_model(workdir).params)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny run in two processes, one device each."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    results = run("mnist", *FLAGS, f"--workdir={workdir}")
    return workdir, results


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same run in one process on one device."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    proc = run_script("mnist", *FLAGS, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_two_processes_write_one_run_and_only_process_0_prints(two):
    workdir, [(_, out0, _), (_, out1, err1)] = two
    assert "cpu x2 (data parallel) over 2 processes" in out0 and "test_accuracy" in out0
    # The data is small: every process keeps all of it on its device.
    assert "data parallel over 2 devices: the training data (" in out0
    assert "MiB) is whole on every device" in out0
    assert quiet(out1) and not err1, out1 + err1
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    # One line per epoch per stage: the second process appended none.
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["stage"], r["epoch"]) for r in lines]
    assert len(stages) == len(set(stages)) == 4 * 4  # 4 stages of 4 epochs
    for name in ("filters.png", "reconstructions.png", "curves.png", "config.json"):
        assert (workdir / name).is_file()
    assert list((workdir / "manifests" / "frozen").iterdir())


def test_two_processes_equal_one_process_up_to_rounding(two, one):
    workdir, _ = two
    for a, b in zip(_leaves(workdir), _leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    two_summary = json.loads((workdir / "summary.json").read_text())
    one_summary = json.loads((one / "summary.json").read_text())
    assert two_summary["test_accuracy"] == pytest.approx(one_summary["test_accuracy"], abs=0.004)
    for a, b in zip(two_summary["stages"], one_summary["stages"], strict=True):
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-3)


def test_a_killed_run_resumes_to_the_params_of_an_uninterrupted_one(two, tmp_path):
    whole, _ = two
    workdir = tmp_path / "run"
    manifest = workdir / "manifests" / "checkpoints" / "pretrain_2" / "2.json"
    every = "--checkpoint_every=0"  # every epoch, saved in the background
    run_until(KILL_AT, launch("mnist", *FLAGS, every, f"--workdir={workdir}"), manifest)
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    [(_, out0, _), _] = run("mnist", *FLAGS, f"--workdir={workdir}")
    assert "pretrain_1: finished in an earlier run" in out0
    assert "pretrain_2: resuming after epoch 2 from" in out0
    for a, b in zip(_leaves(whole), _leaves(workdir), strict=True):
        np.testing.assert_array_equal(a, b)
    # The same run resumed by one process on one device.
    proc = run_script("mnist", *FLAGS, f"--workdir={other}")
    assert proc.returncode == 0, proc.stderr
    assert "pretrain_2: resuming after epoch" in proc.stdout
    for a, b in zip(_leaves(whole), _leaves(other), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_a_run_of_two_processes_loads_in_one(two):
    workdir, _ = two
    model = sae_jax.load_model(workdir)
    mnist = sae_jax.load_mnist("sample")
    accuracy = np.mean(np.argmax(model.predict(mnist.test_images), -1) == mnist.test_labels)
    summary = json.loads((workdir / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_a_sweep_spreads_its_models_over_two_processes_of_two_devices(tmp_path):
    # 2 models on 4 devices: each model on the 2 devices of one process, its
    # minibatches split over them.
    flags = ("--config=tiny", "--config.batch_size=24", "--epochs=1", "--layers=32", "--seeds=2")
    [(_, out0, _), (_, out1, err1)] = run(
        "sweep", *flags, f"--workdir={tmp_path / 'two'}", devices=2
    )
    assert "2 models over 4 devices (models 2 x data 2)" in out0
    assert quiet(out1) and not err1, out1 + err1
    alone = run_script("sweep", *flags, f"--workdir={tmp_path / 'one'}")
    assert alone.returncode == 0, alone.stderr
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    assert (two["processes"], two["devices"], one["devices"]) == (2, 4, 1)
    [two_run], [one_run] = two["runs"], one["runs"]
    np.testing.assert_allclose(two_run["test_accuracy"], one_run["test_accuracy"], atol=0.004)


def test_a_workdir_in_use_is_refused_by_every_process(tmp_path):
    with WorkdirLock(tmp_path):
        results = finish(launch("mnist", *FLAGS, f"--workdir={tmp_path}"))
    [(status0, _, err0), (status1, _, err1)] = results
    assert (status0, status1) == (2, 2), results
    assert err0.startswith(f"error: --workdir={tmp_path} is in use by pid {os.getpid()}")
    assert err1 == f"error: --workdir={tmp_path}: process 0 could not lock it\n"
    assert not (tmp_path / "config.json").exists()


# Process 1's clock runs a million times too fast: by it alone every epoch would be
# due. Process 0 decides, for every process, by its own clock. The softmax stage has no
# epochs (as the seed preset's): it saves its initial params.
SKEWED = """
import sys, time, types
from sae_jax.commands import exits
from sae_jax.commands import flags as cli
from sae_jax.data import DataSpec
from sae_jax.commands.train import run_mnist
from sae_jax.workdir import checkpoint


flags = cli.parser(None).parse_args(sys.argv[1:-1])
config = cli.start(flags).replace(softmax_epochs=0)
if flags.process_id == 1:
    clock = time.monotonic
    checkpoint.time = types.SimpleNamespace(monotonic=lambda: clock() * 1e6)
run_mnist(config, sys.argv[-1], data=DataSpec(source="sample"), figures=False, log=exits.log,
          checkpoint_every=3600)
"""


def test_every_process_saves_when_process_0_decides_and_a_stage_of_no_epochs(tmp_path):
    [(_, out0, _), _] = run(SKEWED, *FLAGS[:2], "--epochs=2", str(tmp_path))
    assert "test_accuracy" in out0
    assert not (tmp_path / "checkpoints").exists()  # no epoch was due by process 0's clock
    stages = ["finetune", "pretrain_1", "pretrain_2", "softmax"]
    assert sorted(p.name for p in (tmp_path / "frozen").iterdir()) == stages
    assert (tmp_path / "frozen" / "softmax" / "0").is_dir()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["stages"][2]["epochs"] == 0


def test_sigterm_to_one_process_stops_every_process_once_the_epoch_is_saved(tmp_path):
    flags = (*FLAGS[:2], "--epochs=30", "--data_source=sample", "--no_figures")
    procs = launch("mnist", *flags, f"--workdir={tmp_path}")
    for line in procs[0].stdout:
        if line.startswith("pretrain_1 epoch   2/30"):
            break
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=120)
    assert [status for status, _, _ in results] == [143, 143], results
    err0 = results[0][2]
    assert err0.startswith("error: stopped by SIGTERM during pretrain_1 (epoch "), err0
    saved = int(err0.split("(epoch ")[1].split()[0])
    assert saved >= 2
    # That epoch is committed, manifest and all (a killed run of two processes resumes
    # from such a checkpoint: test_a_killed_run_resumes_to_the_params_of_an_uninterrupted_one).
    step = tmp_path / "checkpoints" / "pretrain_1" / str(saved)
    assert manifest_problem(tmp_path, step) is None


# What the survivor says: process 0 finds process 1 gone in its next collective; process
# 1 learns that process 0 (the coordinator) is gone either so or from JAX's runtime,
# which then ends it (SIGABRT), whichever comes first.
COLLECTIVE = "error: a collective operation failed: another process of the run stopped"
RUNTIME = "error: the multi-process run failed ("
LOST = {1: ({1}, (COLLECTIVE,)), 0: ({1, -signal.SIGABRT}, (COLLECTIVE, RUNTIME))}


@pytest.mark.parametrize("victim", [1, 0])
def test_a_lost_process_stops_the_other_at_once_in_one_line(tmp_path, victim):
    procs = launch("mnist", *FLAGS, "--epochs=30", "--no_figures", f"--workdir={tmp_path}")
    for line in procs[0].stdout:
        if line.startswith("pretrain_1 epoch   2/30"):
            break
    procs[victim].send_signal(signal.SIGKILL)
    start = time.monotonic()
    status, _, err = finish(procs, timeout=120)[1 - victim]
    assert time.monotonic() - start < 20
    assert err.count("\n") == 1, err[-3000:]
    statuses, lines = LOST[victim]
    assert status in statuses and err.startswith(lines), (status, err)
    assert err.rstrip().endswith("run the same command again in every process to resume")


def test_a_coordinator_that_never_answers_is_one_line_after_the_timeout(tmp_path):
    port = free_port()
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/mnist.py",
            *FLAGS,
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            "--process_id=1",
            "--distributed_timeout=3",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert time.monotonic() - start < 30
    assert (proc.returncode, proc.stderr.count("\n")) == (-signal.SIGABRT, 1), proc.stderr
    assert proc.stderr.startswith("error: the multi-process run failed (DEADLINE_EXCEEDED")
    assert "a process stopped answering for 3 s (--distributed_timeout)" in proc.stderr
