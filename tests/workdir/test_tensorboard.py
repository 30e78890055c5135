"""--tensorboard: a run's epochs, hparams and figures in TensorBoard event files, read
back here with a TFRecord reader of the test's own and tensorboardX's protobufs."""

import builtins
import json
import struct

import numpy as np
import pytest
from conftest import synthetic_config, synthetic_digits

from sae_jax.commands.train import run_mnist
from sae_jax.data import DataSpec
from sae_jax.workdir.tensorboard import (
    TensorBoard,
    TensorBoardUnavailable,
    check_available,
    flatten,
)


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data):
    """CRC-32C (Castagnoli), as TFRecord files use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data):
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
    """The records of a TFRecord file: a little-endian uint64 length, its masked CRC
    (uint32), the data, the data's masked CRC (uint32), over and over; the CRCs are
    checked."""
    raw, at = path.read_bytes(), 0
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[at + 8 : at + 12])
        assert header_crc == _masked_crc(header), f"{path}: bad length CRC at {at}"
        data = raw[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[at + 12 + length : at + 16 + length])
        assert len(data) == length and data_crc == _masked_crc(data), f"{path}: bad record"
        yield data
        at += 12 + length + 4
    assert at == len(raw)


def _events(folder):
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events += [event_pb2.Event.FromString(r) for r in _records(path)]
    return events


@pytest.mark.slow
def test_a_run_writes_its_epochs_hparams_and_figures(tmp_path):
    pytest.importorskip("tensorboardX")
    x, y = synthetic_digits(100, 1, features=64)
    x_test, y_test = synthetic_digits(40, 2, features=64)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    config = synthetic_config(batch_size=20).with_epochs(2)
    workdir = tmp_path / "w"
    summary = run_mnist(
        config, workdir, data=DataSpec(path=str(tmp_path / "d.npz")), log=print, tensorboard=True
    )
    metrics = [line for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars = {}
    for event in _events(workdir / "tensorboard"):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars[(value.tag, event.step)] = value.simple_value
    assert len(metrics) == 8  # 2 epochs of each of the 4 stages
    for stage, epochs in [("pretrain_1", 2), ("pretrain_2", 2), ("softmax", 2), ("finetune", 2)]:
        for epoch in range(1, epochs + 1):
            assert (f"{stage}/loss", epoch) in scalars and (
                f"{stage}/epoch_seconds",
                epoch,
            ) in scalars
    last = summary["stages"][-1]
    assert scalars[("finetune/loss", 2)] == pytest.approx(last["final_loss"], rel=1e-6)
    finetune_accuracy = summary["finetune_test_accuracy"]
    assert scalars[("finetune/test_accuracy", 2)] == pytest.approx(finetune_accuracy[-1])
    assert ("pretrain_1/reconstruction", 1) in scalars and ("pretrain_1/sparsity", 2) in scalars

    tags = {v.tag: v for e in _events(workdir / "tensorboard") for v in e.summary.value}
    for name in ("filters", "reconstructions", "curves"):
        image = tags[name].image
        png = workdir / f"{name}.png"
        width, height = struct.unpack(">II", png.read_bytes()[16:24])
        assert (image.width, image.height) == (width, height)
    assert "config/text_summary" in tags
    assert '"finetune_optimizer"' in tags["config/text_summary"].tensor.string_val[0].decode()

    session = _events(workdir / "tensorboard" / "hparams")
    plugin = [v for e in session for v in e.summary.value if v.metadata.plugin_data.plugin_name]
    content = b"".join(v.metadata.plugin_data.content for v in plugin)
    assert b"layers.0.features" in content and b"finetune_optimizer.learning_rate" in content
    results = {
        v.tag: v.simple_value
        for e in session
        for v in e.summary.value
        if v.tag.startswith("result/")
    }
    assert results["result/test_accuracy"] == pytest.approx(summary["test_accuracy"])


def test_config_flattens_to_dotted_keys():
    tree = {"name": "x", "layers": [{"beta": 3.0, "top_k": None}], "opt": {"lr": 1e-3}}
    assert flatten(tree) == {
        "name": "x",
        "layers.0.beta": 3.0,
        "layers.0.top_k": "None",
        "opt.lr": 1e-3,
    }


def test_without_tensorboardx_the_flag_is_one_line_naming_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(TensorBoardUnavailable, match=r"^--tensorboard needs tensorboardX "):
        check_available()


def test_crc32c_of_the_test_reader():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


def _scalars(events):
    return {
        (v.tag, e.step): v.simple_value
        for e in events
        for v in e.summary.value
        if v.HasField("simple_value")
    }


def test_the_writer_writes_epochs_hparams_text_and_images(tmp_path):
    pytest.importorskip("tensorboardX")
    from matplotlib.image import imsave
    from PIL import Image
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    rgba = tmp_path / "filters.png"
    imsave(rgba, np.linspace(0, 1, 6 * 10).reshape(6, 10))  # RGBA, 6 high, 10 wide
    gray = tmp_path / "curves.png"
    Image.fromarray(np.arange(4 * 9, dtype=np.uint8).reshape(4, 9), mode="L").save(gray)
    config = {
        "batch_size": 160,
        "layers": [{"features": 1000, "top_k": None, "optimizer": {"name": "adam"}}],
        "finetune_optimizer": {"learning_rate": 0.5},
        "tied": True,
    }
    logdir = tmp_path / "tensorboard"
    with TensorBoard(logdir) as board:
        for epoch in (1, 2, 3):
            board.epoch("pretrain_1", epoch, {"loss": 1.0 / epoch, "sparsity": 0.25}, 0.5 * epoch)
        board.epoch("finetune", 1, {"loss": 0.125, "test_accuracy": 0.875}, 2.0)
        board.hparams(config, {"test_accuracy": 0.875, "missing": None})
        board.images([rgba, gray])

    events = _events(logdir)
    assert _scalars(events) == {
        **{("pretrain_1/loss", e): pytest.approx(1.0 / e) for e in (1, 2, 3)},
        **{("pretrain_1/sparsity", e): 0.25 for e in (1, 2, 3)},
        **{("pretrain_1/epoch_seconds", e): 0.5 * e for e in (1, 2, 3)},
        ("finetune/loss", 1): 0.125,
        ("finetune/test_accuracy", 1): 0.875,
        ("finetune/epoch_seconds", 1): 2.0,
    }

    values = {v.tag: v for e in events for v in e.summary.value}
    text = values["config/text_summary"].tensor.string_val[0].decode()
    assert text.startswith("```\n") and text.endswith("\n```")
    assert json.loads(text[4:-4]) == config
    for path, (height, width, channels) in [(rgba, (6, 10, 3)), (gray, (4, 9, 3))]:
        image = values[path.stem].image
        assert (image.height, image.width, image.colorspace) == (height, width, channels)
        assert image.encoded_image_string.startswith(b"\x89PNG")

    # The hparams session lands in <logdir>/hparams, not in a folder named by the time.
    assert [p.name for p in logdir.iterdir() if p.is_dir()] == ["hparams"]
    session = _events(logdir / "hparams")
    plugin = {
        v.tag: HParamsPluginData.FromString(v.metadata.plugin_data.content)
        for e in session
        for v in e.summary.value
        if v.metadata.plugin_data.plugin_name == "hparams"
    }
    hparams = dict(plugin["_hparams_/session_start_info"].session_start_info.hparams)
    assert {k: v.WhichOneof("kind") for k, v in hparams.items()} == {
        "batch_size": "number_value",
        "layers.0.features": "number_value",
        "layers.0.top_k": "string_value",
        "layers.0.optimizer.name": "string_value",
        "finetune_optimizer.learning_rate": "number_value",
        "tied": "bool_value",
    }
    assert hparams["layers.0.features"].number_value == 1000
    assert hparams["layers.0.top_k"].string_value == "None"
    assert hparams["finetune_optimizer.learning_rate"].number_value == 0.5
    assert hparams["tied"].bool_value is True
    metric_tags = [m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos]
    assert metric_tags == ["result/test_accuracy"]
    assert _scalars(session) == {("result/test_accuracy", 0): 0.875}


def test_without_tensorboardx_the_writer_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.split(".")[0] == "tensorboardX":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(TensorBoardUnavailable) as caught:
        TensorBoard(tmp_path / "tensorboard")
    message = str(caught.value)
    assert message == ("--tensorboard needs tensorboardX (pip install 'sae-jax[tensorboard]')")
    assert isinstance(caught.value, ValueError) and not isinstance(caught.value, ImportError)
    assert not (tmp_path / "tensorboard").exists()
