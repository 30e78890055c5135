"""Checkpoints: kill and resume bit for bit, config mismatch, damaged checkpoints, load_model,
and the artifacts a run leaves in its workdir."""

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, run_script, synthetic_config, synthetic_digits

from sae_jax.commands.progress import Progress
from sae_jax.config import OptimizerConfig, tiny
from sae_jax.config.files import config_differences, config_to_json
from sae_jax.config.presets import ADAM
from sae_jax.errors import CheckpointError
from sae_jax.inference import load_model
from sae_jax.models import classifier, init_params
from sae_jax.training.loop import TrainState, init_state
from sae_jax.training.objectives import classifier_loss
from sae_jax.training.pipeline import run_pipeline
from sae_jax.training.stage import Stage, StageRecord, run_stage
from sae_jax.workdir.checkpoint import RunStore, _record

RUNNER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import orbax.checkpoint as ocp
    from sae_jax.config import tiny
    from sae_jax.data import DataSpec
    from sae_jax.commands.train import run_mnist
    from sae_jax.workdir import saving

    workdir, how, kill_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    def log(line):
        print(line, flush=True)
        if how == "saved" and line.startswith(kill_at):  # once that epoch is committed
            stage, _, epoch = line.split()[:3]
            name = f"{int(epoch.split('/')[0])}.json"
            manifest = workdir / "manifests" / "checkpoints" / stage / name
            while not manifest.exists():
                time.sleep(0.01)
            die()
        if how == "now" and line.startswith(kill_at):  # that epoch's save just handed over
            die()

    step_dir = workdir / kill_at  # for the others, a checkpoint: frozen/pretrain_2/0
    if how == "writing":  # orbax has begun writing it, in the background
        save = ocp.CheckpointManager.save
        def save_then_die(self, step, *args, **kw):
            started = save(self, step, *args, **kw)
            if Path(self.directory) / str(step) == step_dir:
                die()
            return started
        ocp.CheckpointManager.save = save_then_die
    if how == "committed":  # orbax has committed it, and its manifest is not written
        manifest = saving.file_manifest
        saving.file_manifest = lambda d: die() if d == step_dir else manifest(d)

    run_mnist(tiny(), workdir, data=DataSpec(source="sample"), figures=False, log=log,
              checkpoint_every=0)
""")


def _run(workdir: Path, how: str = "", kill_at: str = "") -> subprocess.CompletedProcess:
    """A tiny run that saves every epoch, in the background; ``how`` and ``kill_at``
    say when it kills itself with SIGKILL (see ``RUNNER``)."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(workdir), how, kill_at],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def _leaves(model):
    return [np.asarray(a) for a in jax.tree.leaves(model.params)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr
    return workdir


def _killed_then_resumed(workdir: Path, how: str, kill_at: str) -> str:
    """Kill a run as ``how`` and ``kill_at`` say, run it again to the end; its output."""
    killed = _run(workdir, how, kill_at)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr  # really killed
    resumed = _run(workdir)
    assert resumed.returncode == 0, resumed.stderr
    return resumed.stdout


def _assert_same_run(uninterrupted: Path, workdir: Path) -> None:
    """The same params bit for bit, metrics (but the seconds) and test accuracy."""
    for a, b in zip(_leaves(load_model(uninterrupted)), _leaves(load_model(workdir)), strict=True):
        np.testing.assert_array_equal(a, b)
    strip = lambda path: [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in path.read_text().splitlines()
    ]
    assert strip(workdir / "metrics.jsonl") == strip(uninterrupted / "metrics.jsonl")
    whole = json.loads((uninterrupted / "summary.json").read_text())
    after = json.loads((workdir / "summary.json").read_text())
    assert after["test_accuracy"] == whole["test_accuracy"]


@pytest.mark.parametrize("kill_at", ["pretrain_2 epoch   2/3", "finetune   epoch   3/4"])
@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path, kill_at):
    """Killed once the epoch's checkpoint is committed: it resumes from that epoch."""
    out = _killed_then_resumed(tmp_path, "saved", kill_at)
    stage, epoch = kill_at.split()[0], int(kill_at.split()[2].split("/")[0])
    assert f"{stage}: resuming after epoch {epoch} from" in out
    if stage == "finetune":
        assert "pretrain_1: finished in an earlier run" in out
    _assert_same_run(uninterrupted, tmp_path)


@pytest.mark.parametrize(
    "how, kill_at, said",
    [
        # orbax writing epoch 2 in the background: epoch 1, committed before it, is used
        ("writing", "checkpoints/pretrain_1/2", ["pretrain_1: resuming after epoch 1 from"]),
        # the last save, the fine-tuned params, half written: the last epoch is used
        ("writing", "frozen/finetune/0", ["finetune: resuming after epoch 4 from"]),
        # committed but without its manifest: not trusted, the stage's last epoch is used
        (
            "committed",
            "frozen/pretrain_2/0",
            ["pretrain_2/0 is damaged (it has no manifest", "pretrain_2: resuming after epoch 3"],
        ),
        # while the epoch's save is in flight, wherever it is
        ("now", "finetune   epoch   2/4", ["pretrain_1: finished in an earlier run"]),
    ],
)
@pytest.mark.slow
def test_sigkill_with_saves_in_flight_then_resume_is_bit_identical(
    uninterrupted, tmp_path, how, kill_at, said
):
    out = _killed_then_resumed(tmp_path, how, kill_at)
    for line in said:
        assert line in out, out
    _assert_same_run(uninterrupted, tmp_path)


def test_restore_latest_passes_every_damaged_step_and_its_manager_forgets_them(tmp_path):
    """Steps 3 and 2 fail their manifest check: both are moved aside, step 1 is
    restored, and the manager the caller goes on with lists only what is on disk."""
    from sae_jax.files import file_manifest, manifest_path, write_text_atomic
    from sae_jax.workdir.restore import checkpoint_manager, restore_latest

    directory = tmp_path / "checkpoints" / "s"
    manager = checkpoint_manager(directory, None)
    for step in (1, 2, 3):
        tree = {"w": np.full(3, step, np.float32)}
        args = ocp.args.Composite(tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({}))
        manager.save(step, args=args)
        manager.wait_until_finished()
        manifest = manifest_path(tmp_path, directory / str(step))
        manifest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(manifest, json.dumps(file_manifest(directory / str(step))))
    for step in (2, 3):
        manifest_path(tmp_path, directory / str(step)).unlink()
    logs = []
    step_dir, tree, _ = restore_latest(
        manager, directory, {"w": np.zeros(3, np.float32)}, tmp_path, logs.append
    )
    assert step_dir == directory / "1" and tree["w"].tolist() == [1.0, 1.0, 1.0]
    assert [line.split(" is damaged")[0] for line in logs] == [
        f"checkpoint {directory / '3'}",
        f"checkpoint {directory / '2'}",
    ]
    assert len(list((tmp_path / "damaged").iterdir())) == 2
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    manager.close()


def test_a_checkpoint_saved_before_a_field_was_added_resumes_at_its_default(tmp_path):
    """A checkpoint of an earlier version holds a config without the fields added since
    (here ``dtype``, ``param_dtype`` and ``matmul_precision``): they count at their
    defaults, so the run resumes; a field that differs is still refused."""
    config = synthetic_config()
    store = RunStore(tmp_path, config, log=print)
    earlier = config_to_json(config)
    for name in ("dtype", "param_dtype", "matmul_precision"):
        del earlier[name]
    store._check_saved_config({"config": earlier}, tmp_path / "step")
    with pytest.raises(CheckpointError, match=r"another config \(batch_size: 7 -> "):
        store._check_saved_config({"config": {**earlier, "batch_size": 7}}, tmp_path / "step")


def _biggest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _small_config():
    return synthetic_config(batch_size=20, eval_batch_size=50, finetune_epochs=4)


class _Crash(Exception):
    pass


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate", r"has \d+ bytes, expected \d+"),
        ("flip", r"does not match its sha256"),
        ("no_manifest", r"it has no manifest"),
    ],
)
def test_damaged_latest_checkpoint_falls_back(tmp_path, damage, reason):
    config, train, test = _small_config(), synthetic_digits(100, 1), synthetic_digits(40, 2)
    whole = run_pipeline(config, train, test, store=RunStore(tmp_path / "a", config, log=print))

    def crash(stage, epoch, metrics, seconds):
        if stage == "finetune" and epoch == 3:
            raise _Crash  # after epoch 3 was checkpointed

    with pytest.raises(_Crash):
        run_pipeline(
            config, train, test, on_epoch=crash,
            store=RunStore(tmp_path / "b", config, log=print, checkpoint_every=0),
        )  # fmt: skip
    latest = tmp_path / "b" / "checkpoints" / "finetune" / "3"
    biggest = _biggest_file(latest)
    if damage == "truncate":
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(biggest.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        biggest.write_bytes(bytes(raw))
    else:  # killed after orbax committed the checkpoint but before its manifest was written
        (tmp_path / "b" / "manifests" / "checkpoints" / "finetune" / "3.json").unlink()

    logs = []
    resumed = run_pipeline(
        config, train, test,
        store=RunStore(tmp_path / "b", config, log=logs.append, checkpoint_every=0),
    )  # fmt: skip
    damaged = [line for line in logs if "is damaged" in line]
    assert len(damaged) == 1 and str(latest) in damaged[0], logs
    assert re.search(reason, damaged[0]), damaged[0]
    assert "finetune: resuming after epoch 2" in logs[-1]
    moved = list((tmp_path / "b" / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("checkpoints-finetune-3-")
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    kept = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints" / "finetune").iterdir())
    assert kept == [2, 3, 4]  # the last three, the damaged 3 rewritten


def test_other_config_is_refused_and_restart_discards(tmp_path):
    config = _small_config()
    RunStore(tmp_path, config, log=print)
    other = config.replace(seed=5, batch_size=10)
    with pytest.raises(
        CheckpointError,
        match=r"another config \(batch_size: 20 -> 10; "
        r"seed: 0 -> 5\); use another --workdir",
    ):
        RunStore(tmp_path, other, log=print)
    (tmp_path / "notes.txt").write_text("mine")
    RunStore(tmp_path, other, restart=True, log=print)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go


def _np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_load_model_predicts_and_encodes(tmp_path):
    config, train, test = _small_config(), synthetic_digits(100, 1), synthetic_digits(40, 2)
    # Fine-tuning at 3e-2 learns these digits in 4 epochs (3e-3 reaches about 0.5).
    config = config.replace(
        finetune_optimizer=dataclasses.replace(config.finetune_optimizer, learning_rate=3e-2)
    )
    result = run_pipeline(config, train, test, store=RunStore(tmp_path, config, log=print))
    model = load_model(tmp_path)
    assert model.config == config
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the fine-tuned params, not an earlier epoch's
    # The reference, in numpy: pixels / 255, sigmoid encoders, a linear head.
    assert [layer.activation for layer in config.layers] == ["sigmoid", "sigmoid"]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), model.params["params"])
    codes = [test[0] / 255.0]
    for i in range(len(config.layers)):
        encoder = p[f"encoders_{i}"]
        codes.append(_np_sigmoid(codes[-1] @ encoder["kernel"] + encoder["bias"]))
    expected = codes[-1] @ p["head"]["kernel"] + p["head"]["bias"]
    logits = model.predict(test[0])
    assert logits.shape == (40, 4)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(test[0].astype(np.float32) / 255), logits, rtol=1e-6)
    accuracy = float(np.mean(np.argmax(expected, -1) == test[1]))
    assert accuracy > 0.9  # 1.0 here; chance is 0.25
    assert result.test["accuracy"] == pytest.approx(accuracy)
    log_softmax = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
    cross_entropy = -log_softmax[np.arange(40), test[1]].mean()
    assert result.test["loss"] == pytest.approx(cross_entropy, rel=1e-4)
    np.testing.assert_allclose(model.encode(test[0], depth=1), codes[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.encode(test[0]), codes[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="no finished run here"):
        load_model(tmp_path / "empty")


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_cli_writes_metrics_summary_and_figures(tmp_path):
    proc = run_script("mnist", "--config=tiny", f"--workdir={tmp_path}", "--data_source=sample")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["epoch"]) for m in lines] == [
        *[("pretrain_1", e) for e in (1, 2, 3)],
        *[("pretrain_2", e) for e in (1, 2, 3)],
        ("softmax", 1),
        *[("finetune", e) for e in (1, 2, 3, 4)],
    ]
    assert all({"loss", "seconds"} <= set(m) for m in lines)
    assert "sparsity" in lines[0] and "test_accuracy" in lines[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] == lines[-1]["test_accuracy"]
    assert summary["test_accuracy"] > 0.7  # 0.856 here; chance is 0.1
    assert _png_size(tmp_path / "filters.png") == (800, 800)
    assert _png_size(tmp_path / "reconstructions.png") == (1200, 240)
    assert _png_size(tmp_path / "curves.png") == (2000, 350)  # 4 stage panels + accuracy
    proc = run_script("mnist", "--eval_only", f"--workdir={tmp_path}", "--data_source=sample")
    assert proc.returncode == 0, proc.stderr
    assert f"test_accuracy {summary['test_accuracy']:.4f}" in proc.stdout


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib Figure of every PNG that ``sae_jax.workdir.figures`` writes, by file name."""
    from sae_jax.workdir import figures

    figs, save = {}, figures._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def _images(fig, shape=(28, 28), gap=1):
    """The tiles of the figure's one image (a mosaic of ``shape`` tiles ``gap``
    pixels apart), row by row, leaving out tiles that are all NaN (no image)."""
    (ax,) = [ax for ax in fig.axes if ax.images]
    image = np.ma.filled(ax.images[0].get_array(), np.nan)
    (h, w), step = shape, (shape[0] + gap, shape[1] + gap)
    rows, columns = (image.shape[0] + gap) // step[0], (image.shape[1] + gap) // step[1]
    assert image.shape == (rows * step[0] - gap, columns * step[1] - gap)
    tiles = [image[r * step[0] : r * step[0] + h, c * step[1] : c * step[1] + w]
             for r in range(rows) for c in range(columns)]  # fmt: skip
    return [t for t in tiles if not np.isnan(t).all()]


def test_denoising_reconstructions_show_the_corrupted_row(tmp_path, drawn):
    from sae_jax.workdir import figures

    original, corrupted, reconstructed = np.random.default_rng(0).random((3, 6, 784))
    figures.save_reconstructions(original, reconstructed, tmp_path / "r.png", corrupted=corrupted)
    assert _png_size(tmp_path / "r.png") == (720, 360)
    fig = drawn["r.png"]
    rows = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    assert rows == ["original", "corrupted", "reconstructed"]
    images = np.stack(_images(fig, gap=2))
    expected = np.concatenate([original, corrupted, reconstructed])
    np.testing.assert_array_equal(images, expected.reshape(18, 28, 28))


def test_only_curves_are_drawn_for_inputs_that_are_not_square_images(tmp_path):
    """Filters and reconstructions are drawn as square tiles: with 784 (28 x 28) or 64
    inputs they are, with 10 inputs only ``curves.png`` is."""
    from sae_jax.workdir.summary import write_figures

    def names(features: int) -> list[str]:
        config = tiny().replace(input_features=features)
        return [p.name for p in write_figures(tmp_path, config, None, None, write=False)]

    every = ["curves.png", "filters.png", "reconstructions.png"]
    assert sorted(names(784)) == sorted(names(64)) == every
    assert names(10) == names(63) == ["curves.png"]
    assert list(tmp_path.iterdir()) == []  # write=False draws nothing


def test_reconstructions_show_the_corruption_of_the_first_layer_only(tmp_path, drawn):
    """The figure reconstructs through the first layer, so its noise (not a higher
    layer's) decides whether a corrupted row is drawn."""
    from sae_jax.models import FrozenLayer, autoencoder
    from sae_jax.training.pipeline import PipelineResult
    from sae_jax.training.stage import StageRecord
    from sae_jax.workdir.summary import write_figures

    x = np.random.default_rng(2).integers(0, 256, (10, 784)).astype(np.uint8)
    stages = [StageRecord("pretrain_1", 1, history=[{"loss": 1.0}])]
    for noisy, rows in [(0, ["original", "corrupted", "reconstructed"]), (1, ["original",
                        "reconstructed"])]:  # fmt: skip
        layers = [dataclasses.replace(layer, noise="none") for layer in tiny().layers]
        layers[noisy] = dataclasses.replace(layers[noisy], noise="masking", noise_level=0.5)
        config = tiny().replace(layers=tuple(layers))
        module = autoencoder(config.layers[0], 784, config.bias_init)
        first = FrozenLayer(module, init_params(module, jax.random.PRNGKey(0), 784))
        write_figures(tmp_path, config, PipelineResult([first], None, {}, stages), x)
        labels = drawn["reconstructions.png"].axes[0].get_yticklabels()
        assert [label.get_text() for label in labels] == rows


def test_figures_show_the_first_layer_reconstructions_and_histories(tmp_path, drawn):
    from sae_jax.models import FrozenLayer, autoencoder
    from sae_jax.training.pipeline import PipelineResult
    from sae_jax.training.stage import StageRecord
    from sae_jax.workdir.summary import write_figures

    config = tiny()
    assert [layer.noise for layer in config.layers] == ["none", "none"]
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    layers = []
    for layer, key, inputs in zip(config.layers, keys, (784, 64), strict=True):
        module = autoencoder(layer, inputs, config.bias_init)
        layers.append(FrozenLayer(module, init_params(module, key, inputs)))
    losses = {"pretrain_1": [9.0, 5.0, 4.0], "pretrain_2": [3.0, 2.5, 2.2], "softmax": [1.5]}
    losses["finetune"] = [0.9, 0.6, 0.5, 0.45]
    accuracy = {"softmax": [0.7], "finetune": [0.8, 0.85, 0.9, 0.88]}
    stages = [
        StageRecord(
            name,
            len(values),
            history=[
                {"loss": v, **({"test_accuracy": accuracy[name][e]} if name in accuracy else {})}
                for e, v in enumerate(values)
            ],
        )
        for name, values in losses.items()
    ]
    x_test = np.random.default_rng(1).integers(0, 256, (12, 784)).astype(np.uint8)
    write_figures(tmp_path, config, PipelineResult(layers, None, {}, stages), x_test)

    # filters.png: the first layer's 64 weight vectors as 28 x 28 tiles, each scaled
    # by its largest magnitude.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), layers[0].params["params"])
    kernel = p["encoder"]["kernel"]
    tiles = kernel.T.reshape(64, 28, 28) / np.abs(kernel).max(0)[:, None, None]
    np.testing.assert_allclose(np.stack(_images(drawn["filters.png"])), tiles, rtol=1e-6)

    # reconstructions.png: the first 10 test images over their reconstructions.
    x = x_test[:10] / 255.0
    h = _np_sigmoid(x @ kernel + p["encoder"]["bias"])
    r = _np_sigmoid(h @ p["decoder_kernel"] + p["decoder_bias"])
    images = np.stack(_images(drawn["reconstructions.png"], gap=2))
    np.testing.assert_allclose(images[:10], x.reshape(10, 28, 28), rtol=1e-6)
    np.testing.assert_allclose(images[10:], r.reshape(10, 28, 28), rtol=1e-5, atol=1e-6)

    # curves.png: one loss panel per stage, then the accuracy of softmax and finetune.
    *panels, last = drawn["curves.png"].axes
    assert [ax.get_title() for ax in panels] == [f"{name} loss" for name in losses]
    for ax, values in zip(panels, losses.values(), strict=True):
        (line,) = ax.lines
        np.testing.assert_array_equal(line.get_xydata(), np.c_[1 : len(values) + 1, values])
    assert last.get_title() == "accuracy per epoch"
    assert [line.get_label() for line in last.lines] == ["softmax (test)", "finetune (test)"]
    for line, values in zip(last.lines, accuracy.values(), strict=True):
        np.testing.assert_array_equal(line.get_xydata(), np.c_[1 : len(values) + 1, values])


def test_an_epoch_line_shows_the_loss_its_terms_and_the_accuracies_once():
    from sae_jax.commands.progress import format_epoch

    metrics = {"loss": 3.25, "reconstruction": 3.0, "sparsity": 0.25, "test_accuracy": 0.875}
    assert format_epoch("pretrain_1", 3, 10, metrics, 1.5) == (
        "pretrain_1 epoch   3/10 loss 3.25 (reconstruction 3 sparsity 0.25) "
        "test_accuracy 0.8750 1.50s"
    )


def test_progress_bar_on_a_terminal():
    import io

    stream = io.StringIO()
    progress = Progress(tiny().with_epochs(4), print, stream)
    # The ETA is the epochs left times the mean time of an epoch, the first epoch
    # (compilation) left out once there are others.
    for epoch, seconds in zip((1, 2, 3, 4), (9.0, 2.0, 4.0, 3.0), strict=True):
        progress("pretrain_1", epoch, {"loss": 10.0 / epoch}, seconds)
    out = stream.getvalue()
    assert out.count("\r") == 4 and out.endswith("\n")
    lines = [line.rstrip() for line in out.split("\r")[1:]]
    assert lines == [
        "pretrain_1 [#####...............] 1/4 loss 10 ETA 27s",  # 3 x 9
        "pretrain_1 [##########..........] 2/4 loss 5 ETA 4s",  # 2 x 2
        "pretrain_1 [###############.....] 3/4 loss 3.3333 ETA 3s",  # 1 x (2 + 4) / 2
        "pretrain_1 [####################] 4/4 loss 2.5 ETA 0s",
    ]
    assert os.linesep not in out[:-1]


SCHEDULED = OptimizerConfig(
    "sgd", 0.1, momentum=0.9, momentum_start=0.5, momentum_epochs=3, lr_decay=0.8, max_norm=2.0
)


@pytest.mark.parametrize("optimizer, keep", [(ADAM, 1.0), (SCHEDULED, 0.5)], ids=["adam", "sgd"])
def test_resumed_stage_returns_the_best_epoch_of_the_whole_stage(tmp_path, optimizer, keep):
    """The best params so far travel in the checkpoints: a stage interrupted after its
    best epoch returns that epoch's params and stops on the same patience (also with
    schedules, a max-norm constraint and dropout)."""
    config = _small_config()
    x, y = synthetic_digits(100, 1)
    model = classifier(config)
    params = init_params(model, jax.random.PRNGKey(0), config.input_features)
    scores = [0.5, 0.9, 0.6, 0.7, 0.8, 0.85, 0.4, 0.3]  # best at epoch 2; patience 4

    def stage(workdir, score, on_epoch=None):
        spec = Stage(
            "finetune",
            classifier_loss(model, hidden_keep=keep),
            optimizer,
            len(scores),
            20,
            evaluate_fn=lambda p: next(score),
            metric="validation_accuracy",
            keep_best=True,
            patience=4,
        )
        store = RunStore(workdir, config, log=lambda line: None, checkpoint_every=0)
        # A typed key saves and resumes as the legacy key of the same seed trains.
        key = jax.random.key(1) if workdir.name == "resumed" else jax.random.PRNGKey(1)
        return run_stage(spec, params, (x, y), key=key, store=store, on_epoch=on_epoch)

    whole, whole_record = stage(tmp_path / "whole", iter(scores))

    def crash_after_epoch_3(stage_name, epoch, metrics, seconds):
        if epoch == 3:
            raise _Crash

    shared = iter(scores)  # the resumed run goes on with epoch 4's score
    with pytest.raises(_Crash):
        stage(tmp_path / "resumed", shared, crash_after_epoch_3)
    resumed, record = stage(tmp_path / "resumed", shared)

    assert whole_record.best_epoch == record.best_epoch == 2
    assert len(whole_record.history) == len(record.history) == 6  # stopped at 2 + 4
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored, done = RunStore(tmp_path / "resumed", config, log=lambda line: None).finished(
        "finetune", params
    )
    assert done.best_epoch == 2  # the frozen stage remembers it (summary.json reports it)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_differences_name_every_changed_added_and_removed_field():
    old = {"a": 1, "gone": 2, "same": [1, 2], "items": [1, 2], "nested": {"b": 3}}
    new = {"a": 1, "new": 4, "same": [1, 2], "items": [1, 5], "nested": {"b": 6}}
    assert config_differences(old, new) == [
        "gone: 2 -> None",
        "items[1]: 2 -> 5",
        "nested.b: 3 -> 6",
        "new: None -> 4",
    ]
    assert config_differences({"l": [1, 2]}, {"l": [1, 2, 3]}) == ["l: [1, 2] -> [1, 2, 3]"]
    assert config_differences({"opt": {"lr": 1}}, {}) == ["opt: {'lr': 1} -> None"]
    assert config_differences(old, dict(old)) == []


def _state(value: float) -> TrainState:
    return init_state({"w": jnp.full((3,), value)}, optax.adam(0.1))


def _lines(path: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["stage"], r["epoch"], r["loss"]) for r in rows]


def test_run_store_saves_resumes_and_restores_stage_by_stage(tmp_path):
    """RunStore on its own, without training: what each call writes, says and returns."""
    config, logs = _small_config(), []
    store = RunStore(tmp_path, config, keep=2, log=logs.append, checkpoint_every=0)
    assert store.where() == f"before training started; nothing new is saved in {tmp_path}"
    written_config = json.dumps(config_to_json(config), indent=2) + "\n"  # for people to read
    assert (tmp_path / "config.json").read_text() == written_config
    assert store.resume("pretrain_1", _state(0.0)) is None
    assert store.where() == f"during pretrain_1 (no epoch of it is saved yet in {tmp_path})"
    record = StageRecord("pretrain_1", 3)
    for epoch in (1, 2, 3):
        record.history.append({"loss": float(epoch)})
        store.save_epoch("pretrain_1", _state(epoch), jax.random.PRNGKey(epoch), record)
    assert store.where() == f"during pretrain_1 (epoch 3 is saved in {tmp_path})"
    assert sorted(os.listdir(tmp_path / "checkpoints" / "pretrain_1")) == ["2", "3"]  # keep=2
    manifests = tmp_path / "manifests" / "checkpoints" / "pretrain_1"
    assert sorted(os.listdir(manifests)) == ["2.json", "3.json"]
    store.save_finished("pretrain_1", {"w": jnp.full((3,), 7.0)}, record)
    assert store.resume("pretrain_2", _state(0.0)) is None
    assert store.where() == f"during pretrain_2 (no epoch of it is saved yet in {tmp_path})"
    second = StageRecord("pretrain_2", 2, history=[{"loss": 10.0}])
    store.save_epoch("pretrain_2", _state(10.0), jax.random.PRNGKey(10), second)
    written = _lines(tmp_path / "metrics.jsonl")
    assert written == [("pretrain_1", 1, 1.0), ("pretrain_1", 2, 2.0), ("pretrain_1", 3, 3.0),
                       ("pretrain_2", 1, 10.0)]  # fmt: skip
    with open(tmp_path / "metrics.jsonl", "a") as f:  # an epoch not saved, and a torn line
        f.write(json.dumps({"stage": "pretrain_2", "epoch": 2, "loss": 11.0}) + '\n{"stage": "pr')

    logs.clear()
    again = RunStore(tmp_path, config, keep=2, log=logs.append)
    params, done = again.finished("pretrain_1", {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(params["w"], [7.0, 7.0, 7.0])
    assert done == record
    assert _lines(tmp_path / "metrics.jsonl")[:3] == written[:3]  # kept
    assert again.finished("pretrain_2", {"w": jnp.zeros(3)}) is None
    state, resumed, best = again.resume("pretrain_2", _state(0.0))
    np.testing.assert_array_equal(state.params["w"], [10.0, 10.0, 10.0])
    assert resumed == second and best is None
    assert logs == [
        f"pretrain_1: finished in an earlier run, restored from {tmp_path / 'frozen/pretrain_1'}",
        f"pretrain_2: resuming after epoch 1 from {tmp_path / 'checkpoints/pretrain_2'}",
    ]
    assert _lines(tmp_path / "metrics.jsonl") == written


@pytest.mark.parametrize("damage", ["no_manifest", "flipped"])
def test_a_condemned_checkpoint_goes_with_its_manifest_and_metrics(tmp_path, damage):
    """Epoch 2 is damaged: the rerun moves it aside, drops its manifest and its metrics
    line, and resumes from epoch 1."""
    config, record = _small_config(), StageRecord("pretrain_1", 3)
    store = RunStore(tmp_path, config, log=print, checkpoint_every=0)
    for epoch in (1, 2):
        record.history.append({"loss": float(epoch)})
        store.save_epoch("pretrain_1", _state(epoch), jax.random.PRNGKey(epoch), record)
    manifest = tmp_path / "manifests" / "checkpoints" / "pretrain_1" / "2.json"
    if damage == "no_manifest":
        manifest.unlink()
    else:
        biggest = _biggest_file(tmp_path / "checkpoints" / "pretrain_1" / "2")
        biggest.write_bytes(bytes(b ^ 0xFF for b in biggest.read_bytes()))
    logs = []
    state, resumed, _ = RunStore(tmp_path, config, log=logs.append).resume(
        "pretrain_1", _state(0.0)
    )
    assert len(logs) == 2 and "is damaged" in logs[0] and "after epoch 1" in logs[1], logs
    np.testing.assert_array_equal(state.params["w"], [1.0, 1.0, 1.0])
    assert resumed.history == [{"loss": 1.0}]
    assert not manifest.exists() and not (tmp_path / "checkpoints" / "pretrain_1" / "2").exists()
    assert _lines(tmp_path / "metrics.jsonl") == [("pretrain_1", 1, 1.0)]

    (tmp_path / "manifests" / "checkpoints" / "pretrain_1" / "1.json").unlink()  # epoch 1 too
    assert RunStore(tmp_path, config, log=print).resume("pretrain_1", _state(0.0)) is None
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert len(os.listdir(tmp_path / "damaged")) == 2


def test_run_store_keeps_three_epochs_by_default_and_restart_clears_only_its_files(tmp_path):
    config, record = _small_config(), StageRecord("finetune", 5)
    store = RunStore(tmp_path, config, log=print, checkpoint_every=0)
    for epoch in range(1, 6):
        record.history.append({"loss": float(epoch)})
        store.save_epoch("finetune", _state(epoch), jax.random.PRNGKey(epoch), record)
    assert sorted(os.listdir(tmp_path / "checkpoints" / "finetune")) == ["3", "4", "5"]
    store.save_finished("finetune", {"w": jnp.ones(3)}, record)
    (tmp_path / "notes.txt").write_text("mine")
    RunStore(tmp_path, config, restart=True, log=print)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "notes.txt"]


def test_a_checkpoint_saved_under_another_config_is_refused(tmp_path):
    """config.json replaced by hand: the checkpoints still carry the config they were
    saved under, and resuming from them is refused, leaving them in place."""
    config, record = _small_config(), StageRecord("pretrain_1", 2, history=[{"loss": 1.0}])
    RunStore(tmp_path, config, log=print, checkpoint_every=0).save_epoch(
        "pretrain_1", _state(1.0), jax.random.PRNGKey(1), record
    )
    (tmp_path / "config.json").unlink()
    store = RunStore(tmp_path, config.replace(seed=3), log=print)
    with pytest.raises(CheckpointError, match=r"1 was saved by a run with another config \(seed"):
        store.resume("pretrain_1", _state(0.0))
    assert (tmp_path / "checkpoints" / "pretrain_1" / "1").is_dir()


def test_load_model_refuses_a_run_that_has_not_finished(tmp_path):
    RunStore(tmp_path, _small_config(), log=print)  # config.json, but no fine-tuned model
    with pytest.raises(CheckpointError, match=r"no finished run here \(no frozen/finetune"):
        load_model(tmp_path)
    (tmp_path / "no_config" / "frozen" / "finetune").mkdir(parents=True)
    for where in ("no_config", "absent"):
        with pytest.raises(CheckpointError, match="no finished run here"):
            load_model(tmp_path / where)


def test_a_checkpoint_from_before_best_epoch_was_recorded_resumes_with_best_epoch_0():
    meta = {"epochs": 4, "wall_s": 2.5, "history": [{"loss": 1.0}]}  # no "best_epoch"
    assert _record("finetune", meta) == StageRecord("finetune", 4, 2.5, [{"loss": 1.0}], 0)


def test_a_config_json_written_before_newer_fields_reads_with_their_defaults(tmp_path):
    from sae_jax.config.files import config_to_json, read_config

    data = config_to_json(tiny())
    del data["finetune_hidden_keep"], data["finetune_optimizer"]["max_norm"]
    data["_run"] = {"pretrain": False}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_config(tmp_path / "config.json") == config_to_json(tiny()) | {
        "_run": {"pretrain": False}
    }
