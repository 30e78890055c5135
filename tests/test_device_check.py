"""experiments/device_check.sh at a tiny size on the CPU (where its training parts are
the quick start in float32 and in bfloat16, checked within 0.03 of each other), its
flags, and the table it writes, from made-up results where the GPU's own parts cannot
run here."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

import benchmark_device as bd

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

SCRIPT = REPO / "experiments" / "device_check.sh"


def _run(flags: list[str], out, tiny: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OUT": str(out)}
    env["DEVICE_CHECK_PLATFORM"] = "cpu"
    if tiny:
        env["DEVICE_CHECK_TINY"] = "1"
    return subprocess.run(
        ["bash", str(SCRIPT), *flags], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip


def test_it_runs_at_a_tiny_size_on_the_cpu(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = [line.split("\t")[:2] for line in (tmp_path / "status.tsv").read_text().splitlines()]
    assert status == [
        ["env", "0"], ["bench-default", "0"], ["seed-float32", "0"], ["seed-bfloat16", "0"],
        ["all-devices", "one device"], ["tests", "0"], ["sweep", "0"],
    ]  # fmt: skip
    table = (tmp_path / "device_check.md").read_text()
    for row in (
        "| env | jax_backend | cpu |",
        "| tests | failures | 0 | 0 | tests.xml: testsuite@failures |",
        "| sweep | seed 1 test_accuracy |",
        "| seed-float32 | finetune us_per_step |",
        "| all-devices | status | not run: one device |",
    ):
        assert row in table, row
    # The quick start in bfloat16 (--config.dtype=bfloat16) is within 0.03 of float32.
    (gap,) = [r for r in table.splitlines() if r.startswith("| seed-bfloat16 | test_accuracy -")]
    assert gap.endswith("| <= 0.03 (met) | seed-*/summary.json: test_accuracy |"), gap
    bench = json.loads((tmp_path / "bench-default.json").read_text())
    wall = bench["overhead"]["warm"]["total"]["wall_s"]
    source = "bench-default.json: overhead.warm.total.wall_s"
    assert f"| bench-default | warm total wall_s | {wall:.4g} |  | {source} |" in table
    assert "| bench-default | warm pretrain_1 checkpoint_s |" in table
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) > 100 and all(r.split(" | ")[-1].strip(" |") for r in rows)  # sourced


@pytest.mark.parametrize(
    ("flags", "named", "tiny"),
    [
        (["--precision=low"], "--precision=low", True),
        (["--budget=5"], "--budget=5", True),
        (["--fast"], "--fast", True),
        (["--data_dir=no/such/folder"], "--data_dir=no/such/folder", False),
    ],
)
def test_a_bad_flag_is_one_line_and_status_2(flags, named, tiny, tmp_path):
    proc = _run(flags, tmp_path / "out", tiny)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # checked before anything is written


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="0" failures="{failures}" skipped="0" tests="2" time="1.5">
<testcase classname="tests.test_models" name="test_a" time="0.1">{a}</testcase>
<testcase classname="tests.test_cli" name="test_b" time="0.1">{b}</testcase>
</testsuite></testsuites>"""
FAILED = '<failure message="AssertionError: not close&#10;more">trace</failure>'


def test_the_table_of_made_up_gpu_results(tmp_path):
    (tmp_path / "status.tsv").write_text("bench-default\t0\t50\t120\tpython b.py\n"
                                         "tests-tf32\tskip\t0\t3\tpytest\n")  # fmt: skip
    (tmp_path / "tests.xml").write_text(JUNIT.format(failures=2, a=FAILED, b=FAILED))
    (tmp_path / "tests-cpu-rerun.xml").write_text(JUNIT.format(failures=1, a="", b=FAILED))
    total = {"wall_s": 9.0}
    counts = {"lowered": 0}
    report = {"stages": {"pretrain_1": {"wall_s": 1.0}}, "outside": {}, "total": total, **counts}
    bench = {
        "flags": {"platform": "gpu", "config": "seed"}, "header": ["", "machine: H200"],
        "overhead": {"cold": report, "warm": {**report, "total": {"wall_s": 2.0}}},
        "count_events": counts,
        "per_stage": {"warm": {"pretrain_1": {"us_per_step": 60.0}},
                      "torch": {"pretrain_1": {"us_per_step": 90.0}}},
        "whole_process": {"torch": {"process_s": 20.0}},
        "checks": [{"figure": "f", "temperature": "warm", "value": 1.6, "target": ">= 1.52",
                    "met": True}],
    }  # fmt: skip
    (tmp_path / "bench-default.json").write_text(json.dumps(bench))
    for dtype, accuracy, seconds in [("float32", 0.98, 3.0), ("bfloat16", 0.94, 1.5)]:
        run = tmp_path / f"seed-{dtype}"
        run.mkdir()
        summary = {"test_accuracy": accuracy, "total_wall_s": 20.0, "devices": 1,
                   "config": {"batch_size": 160}}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        epochs = [{"stage": "finetune", "epoch": e, "seconds": s} for e, s in
                  [(1, 9.0), (2, seconds), (3, seconds + 1), (4, seconds - 1)]]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in epochs))
        banner = "seed: 60000 training / 0 validation / 10000 test examples, layers ...\n"
        (tmp_path / f"seed-{dtype}.log").write_text(banner)
    table = bd.table(tmp_path).read_text()
    for row in (
        "| tests-tf32 | status | not run | exit 0 | status.tsv: pytest |",
        "| bench-default | header | machine: H200 |  | bench-default.json: header |",
        "| bench-default | cold total wall_s | 9 | <= 8 (NOT met) | bench-default.json: "
        "overhead.cold.total.wall_s |",
        "| bench-default | warm total wall_s | 2 | <= 2.5 (met) |",
        "| bench-default | warm pretrain_1 wall_s | 1 |  | bench-default.json: "
        "overhead.warm.stages.pretrain_1.wall_s |",
        "| bench-default | warm pretrain_1 us_per_step | 60 | <= 50 (NOT met) |",
        "| bench-default | torch pretrain_1 us_per_step | 90 |  |",
        "| bench-default | warm f | 1.6 | >= 1.52 (met) | bench-default.json: checks[0] |",
        "| tests | failures | 2 | 0 | tests.xml: testsuite@failures |",
        "| tests | tests.test_models::test_a | failure: AssertionError: not close | passed |",
        "| tests-cpu-rerun | tests.test_models::test_a | passes on the CPU: GPU only |",
        "| tests-cpu-rerun | tests.test_cli::test_b | fails on the CPU too |",
        "| seed-float32 | test_accuracy | 0.98 |  | seed-float32/summary.json: test_accuracy |",
        # the median of epochs 2 to 4 over 60000 / 160 = 375 steps
        "| seed-float32 | finetune steady epoch_s | 3 |  |",
        "| seed-float32 | finetune us_per_step | 8000 |  | seed-float32/metrics.jsonl: median "
        "seconds of the epochs after the first, 375 steps |",
        "| seed-bfloat16 | finetune us_per_step | 4000 |",
        "| seed-bfloat16 | test_accuracy - float32's | -0.04 | <= 0.03 (NOT met) |",
    ):
        assert row in table, row
    assert "| bench-default | header |  |" not in table  # the empty header line
