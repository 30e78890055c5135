"""Runs on your own data (--data): a classifier from labelled arrays, pretraining alone
without labels, standardization saved with the run, and config.json replayed."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import run_script, synthetic_config, synthetic_digits

import sae_jax
from sae_jax.commands import flags as cli
from sae_jax.commands.saved import write_codes
from sae_jax.commands.train import run_mnist
from sae_jax.data import DataSpec
from sae_jax.errors import ConfigError, UserError


def _quiet(line: str) -> None:
    pass


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _start(*argv: str):
    """The config and data that the command line ``argv`` of experiments/mnist.py asks for."""
    flags = cli.parser(None).parse_args(["--compilation_cache=off", *argv])
    return cli.start(flags), cli.data_spec(flags)


@pytest.mark.slow
def test_labelled_npz_with_overrides_and_its_config_json_replayed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the paths below are relative, as a user gives them
    x, y = synthetic_digits(400, 1)
    x_test, y_test = synthetic_digits(200, 2)
    np.savez("digits.npz", x=x.reshape(400, 8, 8), y=y, x_test=x_test, y_test=y_test)
    config, data = _start(
        "--config=tiny",
        "--data=digits.npz",
        "--config.layers.0.beta=2",
        "--config.finetune_optimizer.learning_rate=1e-2",
    )
    logs = []
    first = run_mnist(config, "first", data=data, figures=False, log=logs.append)
    assert "the data has 64 features and 4 classes: input_features=64, num_classes=4" in logs
    saved = json.loads((tmp_path / "first" / "config.json").read_text())
    assert saved["layers"][0]["beta"] == 2 and saved["input_features"] == 64
    assert saved["num_classes"] == 4 and saved["finetune_optimizer"]["learning_rate"] == 1e-2
    assert saved["_run"] == {"data": {"path": str(tmp_path / "digits.npz")}}
    config, data = _start("--config=first/config.json")  # brings its data back too
    again = run_mnist(config, "again", data=data, figures=False, log=_quiet)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == saved
    assert first["test_accuracy"] == again["test_accuracy"] >= 0.9
    for one, two in zip(first["stages"], again["stages"], strict=True):
        assert one["final_loss"] == two["final_loss"]


def test_images_without_labels_are_pretrained_only(tmp_path):
    x, _ = synthetic_digits(200, 1)
    np.save(tmp_path / "x.npy", x)
    config = synthetic_config().with_epochs(1)
    workdir, logs = tmp_path / "w", []
    summary = run_mnist(
        config, workdir, data=DataSpec(path=str(tmp_path / "x.npy")), log=logs.append
    )
    assert logs[1].startswith(
        "tiny: 200 training / 0 validation / 0 test examples without labels (pretraining only)"
    )
    assert [s["name"] for s in summary["stages"]] == ["pretrain_1", "pretrain_2"]
    assert summary["test_accuracy"] is None and summary["classifier"] is False
    assert sorted(p.name for p in workdir.glob("*.png")) == [
        "curves.png",
        "filters.png",
        "reconstructions.png",
    ]
    model = sae_jax.load_model(workdir)
    assert model.params is None
    with pytest.raises(ValueError, match="this run has no fine-tuned classifier"):
        model.predict(x[:2])
    # the pretrained layers, against numpy on their saved params
    first, second = (jax.device_get(layer.params["params"]) for layer in model.pretrained)
    v = x[:5] / 255.0
    h1 = _sigmoid(v @ first["encoder"]["kernel"] + first["encoder"]["bias"])
    h2 = _sigmoid(h1 @ second["encoder"]["kernel"] + second["encoder"]["bias"])
    np.testing.assert_allclose(model.encoder(1)(x[:5]), h1, atol=1e-5)
    np.testing.assert_allclose(model.encoder()(x[:5]), h2, atol=1e-5)
    back = _sigmoid(h1 @ first["decoder_kernel"] + first["decoder_bias"])
    np.testing.assert_allclose(model.reconstruct(x[:5]), back, atol=1e-5)
    h1_again = _sigmoid(h2 @ second["decoder_kernel"] + second["decoder_bias"])
    deep = _sigmoid(h1_again @ first["decoder_kernel"] + first["decoder_bias"])
    np.testing.assert_allclose(model.reconstruct(x[:5], depth=2), deep, atol=1e-5)
    with pytest.raises(ValueError, match=r"depth must be in 1..2, got 3"):
        model.encoder(3)

    # the same codes from the command line, for the whole training split
    out = run_script("encode", "--workdir=w", "--depth=1", "--split=train", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "with the pretrained stack" in out.stdout  # the only one this run has
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (200, 64) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, model.encoder(1)(x), atol=1e-6)
    for flags, message in [
        (["--split=val"], "--split=val: choose from train, test"),
        (["--split=train", "--depth=3"], "--depth=3: depth must be in 1..2, got 3"),
        (["--split=test"], "has no test split (x_test)"),
    ]:
        bad = run_script("encode", "--workdir=w", *flags, cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert message in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "w", "x.npy"]


@pytest.mark.slow
def test_standardized_csv_saves_its_statistics_and_the_model_applies_them(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = rng.normal(40, 6, (240, 10)) + 12 * y[:, None] * (np.arange(10) % 3 == 0)
    lines = [",".join(["label", *(f"f{i}" for i in range(10))])]
    lines += [",".join([str(c), *(f"{v:.4f}" for v in row)]) for c, row in zip(y, x, strict=True)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    config = synthetic_config(validation_examples=40, batch_size=20).with_epochs(3)
    layer = dataclasses.replace(config.layers[0], decoder_activation="linear")
    config = config.replace(layers=(layer, *config.layers[1:]))
    spec = DataSpec(path=str(tmp_path / "d.csv"), label_column="label", standardize=True)
    run_mnist(config, tmp_path / "w", data=spec, figures=False, log=_quiet)
    saved = np.load(tmp_path / "w" / "standardization.npz")
    rows = np.round(x, 4)[:200]  # the training split: the last 40 rows are validation
    np.testing.assert_allclose(saved["mean"], rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(saved["std"], rows.std(0), rtol=1e-4)
    model = sae_jax.load_model(tmp_path / "w")
    raw = np.round(x[:4], 4)
    np.testing.assert_allclose(
        model.inputs(raw), (raw - rows.mean(0)) / rows.std(0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(model.reconstruct(raw).shape, (4, 10))
    with pytest.raises(ConfigError, match="--standardize: layers\\[0\\] reconstructs"):
        run_mnist(synthetic_config(), tmp_path / "v", data=spec, log=_quiet)


def test_too_few_examples_for_the_batch_size_names_the_flag(tmp_path):
    x, y = synthetic_digits(30, 1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    spec = DataSpec(path=str(tmp_path / "d.npz"))
    with pytest.raises(
        ConfigError, match=r"batch_size=40 is larger than the 30 training .*--config\.batch_size"
    ):
        run_mnist(synthetic_config(batch_size=40), tmp_path / "w", data=spec, log=_quiet)
    assert not (tmp_path / "w").exists()


def test_codes_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    codes = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_codes("c.npy", codes) == tmp_path / "c.npy"
    np.testing.assert_array_equal(np.load("c.npy"), codes)
    for out, message in [
        ("nowhere/c.npy", "--out=nowhere/c.npy: the folder"),
        ("c.txt", "--out=c.txt: name a .npy file"),
    ]:
        with pytest.raises(UserError, match=message):
            write_codes(out, codes)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)  # the data reaches the disk at fsync
    with pytest.raises(OSError):
        write_codes("c.npy", codes + 1)
    np.testing.assert_array_equal(np.load("c.npy"), codes)  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy"]


class _Crash(Exception):
    pass


# The arrays of an .npz file: the training split alone, with labels, and with a test split.
NPZ_KINDS = {
    "images": ("x",),
    "labelled": ("x", "y"),
    "with_test": ("x", "y", "x_test", "y_test"),
}
# Their digests' names in data.json.
NPZ_DIGESTS = {
    "x": "train_images",
    "y": "train_labels",
    "x_test": "test_images",
    "y_test": "test_labels",
}


@pytest.mark.parametrize(
    "before, after, differ",
    [
        ("images", "labelled", "train_labels"),
        ("labelled", "images", "train_labels"),
        ("labelled", "with_test", "test_images, test_labels"),
        ("with_test", "labelled", "test_images, test_labels"),
    ],
    ids=["labels_added", "labels_removed", "test_split_added", "test_split_removed"],
)
def test_a_resumed_run_refuses_arrays_added_or_removed(
    tmp_path, monkeypatch, before, after, differ
):
    """The same file, the same config, the arrays it had unchanged: only arrays added or
    removed, which data.json's digests must tell apart as surely as changed ones."""
    from sae_jax.commands import train
    from sae_jax.errors import CheckpointError

    x, y = synthetic_digits(40, 1)
    x_test, y_test = synthetic_digits(20, 2)
    arrays = {"x": x, "y": y, "x_test": x_test, "y_test": y_test}
    data = tmp_path / "d.npz"
    write = lambda kind: np.savez(data, **{k: arrays[k] for k in NPZ_KINDS[kind]})
    trained = []

    def crash(config, dataset, *args):  # the first run dies before its first epoch
        trained.append(dataset)
        raise _Crash

    monkeypatch.setattr(train, "_train", crash)
    config, spec, workdir = synthetic_config(), DataSpec(path=str(data)), tmp_path / "w"
    write(before)
    with pytest.raises(_Crash):
        run_mnist(config, workdir, data=spec, figures=False, log=_quiet)
    recorded = json.loads((workdir / "data.json").read_text())["sha256"]
    assert set(recorded) == {NPZ_DIGESTS[k] for k in NPZ_KINDS[before]}
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "run.lock"}
    write(after)
    message = (
        f"npz file {data}: not the data that the run in {workdir} started on ({differ} "
        f"differ from {workdir / 'data.json'}); --restart starts over, or use another --workdir"
    )
    with pytest.raises(CheckpointError) as refused:
        run_mnist(config, workdir, data=spec, figures=False, log=_quiet)
    assert str(refused.value) == message
    assert len(trained) == 1  # refused before training
    assert {p: p.read_bytes() for p in files} == files  # and nothing rewritten
    write(before)  # the data it started on: resumed
    with pytest.raises(_Crash):
        run_mnist(config, workdir, data=spec, figures=False, log=_quiet)
    assert len(trained) == 2
