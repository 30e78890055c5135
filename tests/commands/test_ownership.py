"""A run touches only what it wrote: it writes only into a new, empty or sae_jax
folder, --restart removes only a run's own files, a resumed run refuses data that
changed, and the messages of a half-finished run and of an unwritable --out are one
line naming what is wrong (exit status 2)."""

import json
import shutil

import numpy as np
from conftest import run_script

from sae_jax.data import load_sample

TINY = ["--config=tiny", "--epochs=1", "--no_figures"]


def _one_line(proc, status: int = 2) -> str:
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stderr.strip()


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    # Another project's folder: its checkpoints/ and summary.json are not a run's.
    other = tmp_path / "project"
    (other / "checkpoints" / "other").mkdir(parents=True)
    (other / "checkpoints" / "other" / "weights.pt").write_bytes(b"weights")
    (other / "summary.json").write_text('{"mine": true}')
    before = _tree(other)
    for flags in ([], ["--restart"]):
        line = _one_line(run_script("mnist", *TINY, f"--workdir={other}", *flags))
        assert line == (
            f"error: --workdir={other}: holds files that no sae_jax run wrote (checkpoints, "
            f"summary.json); name a new or empty folder"
        )
        assert _tree(other) == before
    line = _one_line(run_script("sweep", "--config=tiny", "--seeds=1", f"--workdir={other}"))
    assert "holds files that no sae_jax run wrote" in line and _tree(other) == before


def test_restart_from_a_folder_of_runs_removes_nothing(tmp_path):
    # The quick start, then --workdir=. --restart where the runs are kept.
    top = tmp_path / "repo"
    top.mkdir()
    assert run_script("mnist", *TINY, "--workdir=checkpoints/mnist", cwd=top).returncode == 0
    (top / "checkpoints" / "other").mkdir()
    (top / "checkpoints" / "other" / "weights.pt").write_bytes(b"weights")
    before = _tree(top)
    line = _one_line(run_script("mnist", *TINY, "--workdir=.", "--restart", cwd=top))
    assert "holds files that no sae_jax run wrote (checkpoints)" in line
    assert _tree(top) == before
    run = top / "checkpoints" / "mnist"
    assert (run / ".sae_jax").is_file()
    again = run_script("mnist", *TINY, f"--workdir={run}", "--restart")  # its own run
    assert again.returncode == 0 and (run / "summary.json").is_file(), again.stderr
    assert (top / "checkpoints" / "other" / "weights.pt").read_bytes() == b"weights"


def test_a_run_left_by_a_version_without_the_mark_is_still_its_own(tmp_path):
    run = tmp_path / "run"
    assert run_script("mnist", *TINY, f"--workdir={run}").returncode == 0
    (run / ".sae_jax").unlink()
    proc = run_script("mnist", *TINY, f"--workdir={run}")
    assert proc.returncode == 0 and "finished in an earlier run" in proc.stdout, proc.stderr
    assert (run / ".sae_jax").is_file()


def test_an_earlier_run_is_known_by_a_valid_config_in_its_config_sweep_or_search_json(
    tmp_path,
):
    """What a version without the mark left: a folder with ``config.json``, or a
    ``sweep.json`` or ``search.json`` that holds a config; nothing else counts."""
    from sae_jax.commands.prepare import earlier_run
    from sae_jax.config import tiny
    from sae_jax.config.files import config_to_json

    config = config_to_json(tiny())
    bad = {**config, "batch_size": 0}
    for name, content, theirs in [
        ("config.json", config, True),
        ("sweep.json", {"config": config, "runs": []}, True),
        ("search.json", {"config": config}, True),
        ("config.json", bad, False),
        ("sweep.json", {"config": bad}, False),
        ("search.json", {"runs": []}, False),
        ("summary.json", {"config": config}, False),
    ]:
        folder = tmp_path / f"{name}-{theirs}-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / name).write_text(json.dumps(content))
        assert earlier_run(folder) is theirs, (name, content)
    (tmp_path / "not_json").mkdir()
    (tmp_path / "not_json" / "search.json").write_text("{")
    assert earlier_run(tmp_path / "not_json") is False


def test_a_resumed_run_refuses_data_that_changed(tmp_path):
    sample = load_sample()
    data = tmp_path / "digits.npz"
    np.savez(data, x=sample.train_images, y=sample.train_labels)
    run = tmp_path / "run"
    first = run_script("mnist", *TINY, f"--data={data}", f"--workdir={run}")
    assert first.returncode == 0, first.stderr
    recorded = json.loads((run / "data.json").read_text())
    assert set(recorded["sha256"]) == {"train_images", "train_labels"}
    np.savez(data, x=sample.train_images[::-1], y=sample.train_labels[::-1])  # replaced
    before = _tree(run)
    line = _one_line(run_script("mnist", *TINY, f"--data={data}", f"--workdir={run}"))
    assert line.startswith(f"error: npz file {data}: not the data that the run in {run}"), line
    assert "train_images, train_labels differ" in line and "--restart starts over" in line
    assert _tree(run) == before
    restarted = run_script("mnist", *TINY, f"--data={data}", f"--workdir={run}", "--restart")
    assert restarted.returncode == 0, restarted.stderr


def test_a_run_stopped_before_fine_tuning_ended_says_so(tmp_path):
    run = tmp_path / "run"
    assert run_script("mnist", *TINY, f"--workdir={run}").returncode == 0
    shutil.rmtree(run / "frozen" / "finetune")  # as if killed during fine-tuning
    line = _one_line(run_script("mnist", "--eval_only", f"--workdir={run}"))
    assert line == (
        f"error: {run}: nothing to evaluate: the run has no fine-tuned classifier yet (it "
        "stopped before fine-tuning ended; run the same command again to resume it)"
    )
    proc = run_script("encode", f"--workdir={run}", "--out=/proc/codes.npy", "--pretrained")
    line = _one_line(proc)
    assert line.startswith("error: --out=/proc/codes.npy: cannot write it ("), line
