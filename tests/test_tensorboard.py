"""--tensorboard: a run's epochs, hparams and figures in TensorBoard event files, read
back here with a TFRecord reader of the test's own and tensorboardX's protobufs."""

import builtins
import struct

import numpy as np
import pytest
from conftest import synthetic_config, synthetic_digits

from sae_jax.data import DataSpec
from sae_jax.experiment import run_mnist
from sae_jax.tensorboard import TensorBoard, TensorBoardUnavailable, check_available, flatten


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
