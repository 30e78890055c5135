"""sae-jax benchmark (and experiments/benchmark.py): the overhead arithmetic on a
made-up record, the derived checks, bad flags, and the commands of its docstring at a
tiny size."""

import json
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_MNIST, command_argv, docstring_commands

import sae_jax.cli.benchmark_overhead as bo
import sae_jax.cli.benchmark_report as br

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

SCRIPT = REPO / "experiments" / "benchmark.py"
MODULE = REPO / "sae_jax" / "cli" / "benchmark.py"


def made_up_run() -> dict:
    """A run of 10 s: stage a (3 epochs) from 1 to 4, whose second save runs while its
    third epoch does, and stage b (1 epoch) from 6.5 to 8."""
    store = [
        [1.0, 1.0, "finished", "a"],
        [1.0, 1.0, "resume", "a"],
        [2.2, 2.4, "save_epoch", "a"],  # epoch 1 ran from 1.0 to 2.2
        [2.9, 3.1, "save_epoch", "a"],  # epoch 2 from 2.6 to 2.9; epoch 3 from 3.0
        [3.5, 3.6, "save_epoch", "a"],  # epoch 3 to 3.5
        [3.6, 4.0, "save_finished", "a"],  # which compiles from 3.7 to 3.8
        [6.5, 6.5, "finished", "b"],
        [7.8, 7.9, "save_epoch", "b"],
        [7.9, 8.0, "save_finished", "b"],
        [9.0, 9.5, "close", None],  # outside the stages
    ]
    compile_ = [
        [1.0, 1.5, bo.TRACE],
        [1.1, 1.3, bo.TRACE],  # inside the one before: counted once
        [1.5, 2.0, bo.BACKEND],
        [3.7, 3.8, bo.BACKEND],
        [5.0, 6.0, bo.BACKEND],  # outside the stages
        [6.5, 6.9, bo.BACKEND],  # b's, before its first save
    ]
    seconds = {"a": [1.2, 0.3, 0.5], "b": [1.0]}
    return {
        "total_wall_s": 10.0,
        "stages": bo.stage_windows(store, seconds),
        "compile": compile_,
        "store": store,
        "events": {bo.LOWER: [1.4, 1.9, 5.5], bo.CACHE_HITS: [1.9], bo.BACKEND: [2.0, 6.0]},
    }


def test_overhead_of_a_made_up_run():
    report = bo.overhead(made_up_run())
    a, b = report["stages"]["a"], report["stages"]["b"]
    # 0.1 s of the second save ran during the third epoch: in its seconds, not again
    assert a == pytest.approx(
        {"wall_s": 3.0, "epochs_s": 2.0, "steady_s": 1.2, "compile_s": 1.1,
         "checkpoint_s": 0.7, "rest_s": 0.0, "checkpoint_in_epochs_s": 0.1,
         "programs": 2, "cache_hits": 1}
    )  # fmt: skip
    # one epoch: its steady seconds are the epoch less the compilation before its save
    assert b == pytest.approx(
        {"wall_s": 1.5, "epochs_s": 1.0, "steady_s": 0.6, "compile_s": 0.4,
         "checkpoint_s": 0.2, "rest_s": 0.3, "checkpoint_in_epochs_s": 0.0,
         "programs": 0, "cache_hits": 0}
    )  # fmt: skip
    assert report["outside"] == pytest.approx(
        {"wall_s": 5.5, "epochs_s": 0.0, "steady_s": 0.0, "compile_s": 1.0,
         "checkpoint_s": 0.5, "rest_s": 4.0, "checkpoint_in_epochs_s": 0.0,
         "programs": 1, "cache_hits": 0}
    )  # fmt: skip
    assert report["total"] == pytest.approx(
        {"wall_s": 10.0, "epochs_s": 3.0, "steady_s": 1.8, "compile_s": 2.5,
         "checkpoint_s": 1.4, "rest_s": 4.3, "checkpoint_in_epochs_s": 0.1,
         "programs": 3, "cache_hits": 1}
    )  # fmt: skip
    assert (report["lowered"], report["backend_compiles"], report["cache_hits"]) == (3, 2, 1)
    for k in bo.FIGURES:  # the stages and the outside add up to the total
        parts = a[k] + b[k] + report["outside"][k]
        assert parts == pytest.approx(report["total"][k]), k


def test_span_arithmetic():
    assert bo.union([(3, 4), (0, 1), (0.5, 2), (2, 2.5)]) == [(0, 2.5), (3, 4)]
    assert bo.minus([(0, 10)], [(1, 2), (5, 6)]) == [(0, 1), (2, 5), (6, 10)]
    assert bo.minus([(0, 1), (3, 4)], [(0.5, 3.5)]) == [(0, 0.5), (3.5, 4)]
    assert bo.length([(0, 2), (3, 4)], (1, 3.5)) == pytest.approx(1.5)
    # epoch k ends where its save starts; saves and epochs not one to one: unknown
    assert bo.epoch_spans({"saves": [2, 5], "epoch_s": [1.5, 2]}) == [(0.5, 2), (3, 5)]
    assert bo.epoch_spans({"saves": [2], "epoch_s": [1.5, 2]}) == []


def test_the_median_report_and_its_table():
    run = made_up_run()
    slower = {**run, "total_wall_s": 12.0}
    report = bo.median_report([bo.overhead(run), bo.overhead(slower), bo.overhead(slower)])
    assert report["total"]["wall_s"] == 12.0 and report["stages"]["a"]["wall_s"] == 3.0
    rows = bo.table(report).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == [
        "| a", "| b", "| outside stages", "| total"
    ]  # fmt: skip
    assert rows[-1] == "| total | 12.00 | 3.00 | 1.80 | 2.50 | 1.40 | 6.30 | 0.10 | 3 | 1 |"


def test_derived_checks_against_their_targets():
    reports = {t: bo.overhead(made_up_run()) for t in br.TEMPERATURES}
    reports["warm"]["total"] = {**reports["warm"]["total"], "wall_s": 5.5}  # < 2x epochs
    tiny = br.derived_checks("tiny", reports, {"cold": 12.0, "warm": 8.0})
    assert [(c["temperature"], c["value"], c["target"], c["met"]) for c in tiny] == [
        ("cold", pytest.approx(10 / 3.0), None, None),
        ("warm", pytest.approx(5.5 / 3.0), "<= 2", True),
    ]
    seed = br.derived_checks("seed", reports, {"cold": 12.0, "warm": 8.0, "torch": 12.2})
    met = [(c["temperature"], c["met"]) for c in seed]
    assert met == [("cold", False), ("warm", False), ("cold", False), ("warm", True)]
    assert seed[3]["value"] == pytest.approx(12.2 / 8.0)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--config=huge"], "--config=huge"),
        (["--precision=low"], "--precision=low"),
        (["--platform=quantum"], "--platform=quantum"),
        (["--config=seed", "--epochs=1"], "--epochs=1"),
        (["--repeats=0"], "--repeats=0"),
        (["--data_dir=no/such/folder"], "--data_dir=no/such/folder"),
        (["--json=no/such/folder/x.json"], "--json=no/such/folder/x.json"),
        (["--config=seed", "--platform=tpu"], "--platform=tpu"),
        (["--platform=tpu", "--repeats=1"], "--platform=tpu"),  # the command refuses it
    ],
)
def test_a_bad_flag_is_one_line_and_status_2(flags, named):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert proc.stdout == ""


# What each docstring command gets appended to run at a tiny size (a later flag wins).
TINY = ["--repeats=1", "--epochs=2", "--train_examples=160", "--test_examples=50"]


@pytest.mark.parametrize("argv", docstring_commands(MODULE), ids=shlex.join)
def test_every_docstring_command_runs_at_a_tiny_size(argv, tmp_path):
    if "--config=seed" in argv:
        pytest.importorskip("torch")
        if not SHARED_MNIST.is_dir():
            pytest.skip(f"no MNIST files at {SHARED_MNIST}")
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [*command_argv(argv), *TINY, f"--json={out}"], cwd=REPO, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    cold, warm = figures["overhead"]["cold"], figures["overhead"]["warm"]
    stages = ["pretrain_1", "pretrain_2", "finetune"]
    if "--config=tiny" in argv:
        stages.insert(2, "softmax")
    assert list(cold["stages"]) == list(warm["stages"]) == stages
    # cold: every program compiled; warm: every one read from the cold run's cache
    assert cold["lowered"] > 0 and cold["cache_hits"] == 0
    assert warm["cache_hits"] == warm["lowered"] == cold["lowered"]
    for report in (cold, warm):
        for name, row in report["stages"].items():
            assert row["checkpoint_s"] > 0 and row["steady_s"] > 0, name
            assert row["wall_s"] >= row["epochs_s"] > 0, name
    assert "| total |" in proc.stdout and "persistent-cache hits" in proc.stdout
    assert {c["figure"] for c in figures["checks"]} == set(br.CHECKS[_config(argv)])
    if "--config=seed" in argv:
        assert set(figures["whole_process"]) == {"cold", "warm", "torch"}


def _config(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
