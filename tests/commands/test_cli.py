"""experiments/mnist.py as a user runs it."""

import json
import os
import time

import numpy as np
import pytest
from conftest import run_in_process, run_script


def test_the_platform_is_the_backend_jax_finds_unless_one_is_named(monkeypatch):
    """By default (``auto``) JAX is not pinned to a platform: on a GPU or TPU host the
    run trains there. A named platform pins it."""
    from sae_jax.commands import prepare
    from sae_jax.commands.flags import parser

    assert parser(None).parse_args([]).platform == "auto"
    pinned = []
    monkeypatch.setattr(prepare.jax.config, "update", lambda *setting: pinned.append(setting))
    prepare.select_platform("auto")
    assert pinned == []
    prepare.select_platform("cpu")
    assert pinned == [("jax_platforms", "cpu")]


def _run(*flags):
    return run_script("mnist", *flags)


def test_tiny_run_writes_summary(mnist_dir, tmp_path):
    proc = _run(
        "--platform=cpu",
        "--config=tiny",
        f"--data_dir={mnist_dir}",
        f"--workdir={tmp_path / 'run'}",
        "--epochs=1",
        "--seed=3",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("pretrain_1 epoch   1/1 loss") for line in lines)
    assert any("finetune" in line and "test_accuracy" in line for line in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.3  # 0.50 here; chance is 0.1
    assert summary["config"]["seed"] == 3 and summary["config"]["name"] == "tiny"
    assert [s["name"] for s in summary["stages"]] == [
        "pretrain_1",
        "pretrain_2",
        "softmax",
        "finetune",
    ]
    assert all(set(s) == {"name", "epochs", "wall_s", "final_loss"} for s in summary["stages"])
    assert summary["total_wall_s"] > 0 and summary["platform"] == "cpu"
    # No epoch checkpoints: the whole run is shorter than --checkpoint_every (60 s).
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".sae_jax",
        "config.json",
        "curves.png",
        "data.json",
        "filters.png",
        "frozen",
        "manifests",
        "metrics.jsonl",
        "reconstructions.png",
        "run.lock",
        "summary.json",
    ]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epochs=two"], "argument --epochs: invalid int value: 'two'"),
        (["--epochs=-1"], "--epochs=-1: epochs must be >= 0, got -1"),
        (["--finetune_lr=0"], "--finetune_lr=0.0: finetune_optimizer.learning_rate must be > 0"),
        (["--finetune_lr=-1"], "--finetune_lr=-1.0: finetune_optimizer.learning_rate must be > 0"),
        (
            ["--finetune_lr=nan"],
            "--finetune_lr=nan: finetune_optimizer.learning_rate must be a finite number, got nan",
        ),
        (
            ["--finetune_lr=inf"],
            "--finetune_lr=inf: finetune_optimizer.learning_rate must be a finite number, got inf",
        ),
        (["--seed=-1"], "--seed=-1: seed must be an integer in [0, 4294967296), got -1"),
        (
            ["--seed=4294967296"],
            "--seed=4294967296: seed must be an integer in [0, 4294967296), got 4294967296",
        ),
        (["--config=sead"], "unknown preset 'sead'"),
        (["--config.layers.0.bta=2"], "--config.layers.0.bta=2: no field 'bta' in layers.0"),
        (["--data=/nonexistent/d.npz"], "/nonexistent/d.npz: file not found"),
        (["--dataset=emnist"], "--dataset=emnist: choose from mnist, fashion_mnist, kmnist"),
        (["--platform=tpu"], "--platform=tpu: no tpu backend here"),
        (["--platform=quantum"], "--platform=quantum: choose from auto, cpu, gpu, tpu"),
        (
            ["--data_source=idx", "--data_dir=/nonexistent/mnist"],
            "/nonexistent/mnist: data directory not found",
        ),
        (["--data_source=idx"], "the idx source needs a data directory (--data_dir)"),
        (["--data_source=ftp"], "unknown data source 'ftp'"),
        (["--bogus=1"], "unrecognized arguments: --bogus=1"),
        (
            ["--checkpoint_every=-1"],
            "argument --checkpoint_every: must be a number of seconds >= 0, not '-1'",
        ),
        (
            ["--checkpoint_every=nan"],
            "argument --checkpoint_every: must be a number of seconds >= 0, not 'nan'",
        ),
        (["--distributed"], "--platform=auto: cannot join the multi-host run"),
        (["--distributed", "--distributed_timeout=0"], "--distributed_timeout=0: must be >= 1"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(flags, message, tmp_path):
    proc = _run("--config=tiny", f"--workdir={tmp_path / 'w'}", *flags)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["train", "sweep", "search", "encode"])
def test_a_url_as_workdir_is_refused_and_no_folder_named_after_its_scheme_is_made(
    command, tmp_path
):
    extra = {
        "sweep": ["--seeds=2"],
        "search": ["--space=beta=1,2", "--config.validation_examples=100"],
    }
    flags = ["--config=tiny", *extra.get(command, [])] if command != "encode" else []
    proc = run_in_process([command, *flags, "--workdir=gs://bucket/run"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "error: --workdir=gs://bucket/run: a gs:// URL; sae_jax reads and writes local paths "
        "only: mount the bucket"
    ), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_url_given_to_the_library_is_refused():
    from sae_jax import load_mnist, load_model

    with pytest.raises(ValueError, match=r"^s3://b/run: a s3:// URL; sae_jax reads and writes"):
        load_model("s3://b/run")
    with pytest.raises(ValueError, match=r"^gs://b/mnist: a gs:// URL"):
        load_mnist(data_dir="gs://b/mnist", source="idx")


def test_damaged_file_is_named(tmp_path):
    import numpy as np

    from sae_jax.data import MNIST_FILES, write_idx

    for stem in MNIST_FILES.values():
        write_idx(
            tmp_path / f"{stem}.gz", np.zeros((3,) if "labels" in stem else (3, 28, 28), np.uint8)
        )
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    proc = _run(
        "--config=tiny",
        "--data_source=idx",
        f"--data_dir={tmp_path}",
        f"--workdir={tmp_path / 'w'}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"error: {tmp_path}/train-images-idx3-ubyte.gz: too short to be an IDX file (0 bytes)\n"
    )


def test_tiny_runs_offline_with_no_data_dir_and_no_pretraining(tmp_path):
    proc = _run(
        "--config=tiny",
        "--epochs=1",
        "--finetune_lr=0.0025",
        "--no_pretraining",
        f"--workdir={tmp_path / 'w'}",
        "--mirror=http://127.0.0.1:9/",
        f"--cache_dir={tmp_path / 'cache'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "MNIST: bundled sample mnist_sample.npz" in proc.stdout
    stages = [line.split()[0] for line in proc.stdout.splitlines() if " epoch " in line]
    assert stages == ["finetune"]  # no pretraining, no softmax stage
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["pretrained"] is False
    assert [s["name"] for s in summary["stages"]] == ["finetune"]
    assert summary["test_accuracy"] > 0.3  # 0.52 here; chance is 0.1
    assert "figures" not in summary and not (tmp_path / "w" / "filters.png").exists()
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["finetune_optimizer"]["learning_rate"] == 0.0025  # tiny's own is 3e-3
    assert saved["_run"] == {"pretrain": False}  # a pretrained run here would be refused


def test_no_verify_reads_idx_files_that_are_not_canonical_mnist(tmp_path):
    from sae_jax.data import MNIST_FILES, write_idx

    for stem in MNIST_FILES.values():
        write_idx(
            tmp_path / f"{stem}.gz", np.zeros((3,) if "labels" in stem else (3, 28, 28), np.uint8)
        )
    proc = _run(
        "--config=tiny",
        "--data_source=idx",
        f"--data_dir={tmp_path}",
        f"--workdir={tmp_path / 'w'}",
        "--no_verify",
    )
    # Checked, files that are not canonical MNIST fail on their sha256 (tests/test_data.py);
    # unchecked they are read, and the run goes on to find that tiny's batch of 25 does
    # not fit in 3 images.
    assert f"MNIST: IDX files in {tmp_path}" in proc.stdout
    assert proc.returncode == 2 and "sha256" not in proc.stderr
    assert proc.stderr.startswith("error: batch_size=25 ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("source", ["download", "auto"])
def test_no_network_is_one_line_and_fast(tmp_path, source):
    start = time.perf_counter()
    proc = _run(
        "--config=seed",
        f"--data_source={source}",
        "--mirror=http://127.0.0.1:9/",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--workdir={tmp_path / 'w'}",
    )
    assert time.perf_counter() - start < 30  # includes starting Python and importing jax
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot download http://127.0.0.1:9/train-images-idx3-ubyte.gz" in proc.stderr
    assert "point --data_dir at a folder" in proc.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seeds=0"], "--seeds=0: must be >= 1"),
        (["--seeds=2", "--hparam=beta=x,y"], "--hparam=beta=x,y: expected NAME=V1,V2,..."),
        (["--layers=a,b"], "--layers=a,b: not a list of integers"),
        (["--layers=0,8"], "--layers=0,8: layers[0].features must be a positive integer, got 0"),
        (["--study=other"], "--study=other: the only study is 'pretraining'"),
        (
            ["--hparam=momentum=0.1,0.2"],
            "--hparam=momentum=0.1,0.2: cannot sweep 'momentum'; choose from rho, beta,",
        ),
        (["--hparam=beta=-1,2"], "--hparam=beta=-1,2: layers[0].beta must be >= 0, got -1.0"),
        (["--hparam=rho=0,0.5"], "--hparam=rho=0,0.5: layers[0].rho must be in (0, 1), got 0.0"),
        (["--hparam=rho=1.5"], "--hparam=rho=1.5: layers[0].rho must be in (0, 1), got 1.5"),
        (
            ["--hparam=finetune_learning_rate=1e-3,inf"],
            "--hparam=finetune_learning_rate=1e-3,inf: finetune_optimizer.learning_rate must be "
            "a finite number, got inf",
        ),
        (
            ["--hparam=beta=1", "--hparam=beta=2"],
            "--hparam=beta=2: beta is already swept by --hparam=beta=1",
        ),
        (
            ["--hparam=noise_level=0.1,0.5"],  # tiny has no noise: the same model twice
            "--hparam=noise_level=0.1,0.5: noise_level changes nothing here: every layer's "
            "noise is 'none'",
        ),
        (
            ["--config.layers.0.beta=0", "--config.layers.1.beta=0", "--hparam=rho=0.1,0.2"],
            "--hparam=rho=0.1,0.2: rho changes nothing here: rho is the sparsity target",
        ),
        (
            ["--seed=4294967295", "--seeds=2"],
            "--seed=4294967295 --seeds=2: seed must be an integer in [0, 4294967296), "
            "got 4294967296",
        ),
    ],
)
def test_sweep_user_mistakes(flags, message, tmp_path):
    proc = run_script("sweep", "--config=tiny", f"--workdir={tmp_path / 'w'}", *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "w").exists()
    assert "MNIST:" not in proc.stdout  # refused before any data was looked for


def test_run_sweep_checks_every_model_before_it_touches_the_workdir(tmp_path):
    """Called from Python, as the command does after its own checks: a value that
    changes nothing is refused before the workdir is made or any data looked for."""
    from sae_jax.commands.sweep import run_sweep
    from sae_jax.config import ConfigError, tiny

    logs = []
    with pytest.raises(ConfigError, match="noise_level changes nothing here"):
        run_sweep(
            tiny(),
            tmp_path / "w",
            seeds=[0, 0],
            hparams={"noise_level": [0.1, 0.5]},
            log=logs.append,
        )
    assert logs == [] and list(tmp_path.iterdir()) == []


def test_run_mnist_refuses_an_invalid_config_before_it_looks_for_the_data(tmp_path):
    from sae_jax.commands.train import run_mnist
    from sae_jax.config import ConfigError, tiny
    from sae_jax.data import DataSpec

    missing = DataSpec(path=str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match=r"^batch_size must be a positive integer, got 0$"):
        run_mnist(tiny().replace(batch_size=0), tmp_path / "w", data=missing, log=print)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sweep_study_writes_a_table(tmp_path):
    proc = run_script(
        "sweep",
        "--config=tiny",
        "--seeds=2",
        "--epochs=1",
        "--study=pretraining",
        "--layers=32,16",
        f"--workdir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "| yes | " in proc.stdout and "| no | " in proc.stdout
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["pretrain"] for r in summary["runs"]] == [True, False]
    assert all(len(r["test_accuracy"]) == 2 for r in summary["runs"])
    assert [layer["features"] for layer in summary["config"]["layers"]] == [32, 16]


def _row_cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_sweep_is_a_grid_of_values_and_seeds(tmp_path):
    proc = run_script(
        "sweep",
        "--config=tiny",
        "--epochs=1",
        "--seeds=2",
        "--hparam=beta=0.5,2",
        "--seed=5",
        "--layers=16,8",
        f"--workdir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny: 4 models at once (2 grid points x 2 seeds), " in proc.stdout
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["hparams"] == {"beta": [0.5, 2.0]}
    assert summary["model_seeds"] == [5, 6, 5, 6]  # value-major: both seeds of beta 0.5 first
    assert summary["model_hparams"] == {"beta": [0.5, 0.5, 2.0, 2.0]}
    (run,) = summary["runs"]
    assert run["pretrain"] and len(run["test_accuracy"]) == 4
    assert [p["hparams"] for p in run["points"]] == [{"beta": 0.5}, {"beta": 2.0}]
    assert all(p["seeds"] == [5, 6] for p in run["points"])
    assert [a for p in run["points"] for a in p["test_accuracy"]] == run["test_accuracy"]
    rows = [_row_cells(line) for line in proc.stdout.splitlines() if line.startswith("| yes |")]
    assert [row[1] for row in rows] == ["0.5", "2"]  # one row per beta value
    betas = np.asarray(summary["model_hparams"]["beta"])
    for row, beta in zip(rows, (0.5, 2.0), strict=True):
        errors = 1.0 - np.asarray(run["test_accuracy"])[betas == beta]
        mean, sd = (float(v) for v in row[2].split("+-"))
        assert mean == pytest.approx(errors.mean(), abs=1e-4)
        assert sd == pytest.approx(errors.std(ddof=1), abs=1e-4)
        assert row[3] == " ".join(f"{e:.4f}" for e in errors)


@pytest.mark.slow
def test_compilation_cache_is_filled_and_can_be_turned_off(tmp_path):
    cache = tmp_path / "jax_cache"
    proc = run_script(
        "mnist",
        "--config=tiny",
        "--epochs=1",
        "--no_figures",
        f"--workdir={tmp_path / 'a'}",
        f"--compilation_cache={cache}",
        process=True,  # a process of its own: this one's cache is set already
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(cache.iterdir())) > 5  # the stage programs, encoders, evaluations
    # Off, nothing is cached: neither in the default place nor in a folder named "off".
    home, cwd = tmp_path / "home_cache", tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["SAE_JAX_CACHE_DIR"] = str(home)
    proc = run_script(
        "mnist",
        "--config=tiny",
        "--epochs=1",
        "--no_pretraining",  # fewer programs: still none may be cached
        "--no_figures",
        f"--workdir={tmp_path / 'b'}",
        "--compilation_cache=off",
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == [] and not (home / "jax").exists()
