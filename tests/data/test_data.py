"""MNIST loading: IDX parsing and its damage cases, downloads from a local server,
tensorflow-datasets, the bundled sample, and the real files (where present)."""

import dataclasses
import gzip
import hashlib
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
from conftest import MNIST_NAMES, free_port, make_synthetic_mnist

from sae_jax import data
from sae_jax.data import DataError, download, load_idx_dir, load_mnist, read_idx, write_idx

RNG = np.random.default_rng(0)


def _trust(monkeypatch, sha256: dict, dataset: str = "mnist") -> None:
    """Make ``sha256`` (file name -> hash) the published hashes of ``dataset``."""
    spec = dataclasses.replace(data.IDX_DATASETS[dataset], sha256=sha256)
    monkeypatch.setitem(data.IDX_DATASETS, dataset, spec)


def _fake_mnist_dir(folder: Path, n_train=6, n_test=4, gz=True, labels=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": RNG.integers(0, 10, n_train).astype(np.uint8),
        "test_images": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": RNG.integers(0, 10, n_test).astype(np.uint8)
        if labels is None
        else np.asarray(labels, np.uint8),
    }
    for key, stem in data.MNIST_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return folder


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        RNG.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        RNG.integers(0, 10, 17).astype(np.uint8),
        RNG.integers(-1000, 1000, (3, 2)).astype(np.int32),
        RNG.normal(size=(2, 3, 4, 5)).astype(np.float32),
    ],
)
def test_idx_round_trip(tmp_path, array, gz):
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    write_idx(path, array)
    got = read_idx(path)
    assert got.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, array)


# The IDX format spelled out by hand: magic number 0x0000TTNN (TT: type code, NN: the
# number of dimensions), the dimensions as big-endian uint32, the data big-endian.
_UINT8_IMAGES = np.arange(2 * 28 * 28, dtype=np.uint64).reshape(2, 28, 28).astype(np.uint8)
_HAND_BUILT_IDX = [
    (_UINT8_IMAGES, struct.pack(">IIII", 0x00000803, 2, 28, 28) + _UINT8_IMAGES.tobytes()),
    (
        np.array([5, 0, 4, 1, 9], np.uint8),
        struct.pack(">II", 0x00000801, 5) + bytes([5, 0, 4, 1, 9]),
    ),
    (
        np.array([[1, -2], [300, -70000]], np.int32),
        struct.pack(">III", 0x00000C02, 2, 2) + struct.pack(">4i", 1, -2, 300, -70000),
    ),
    (
        np.array([0.5, -1.25, 3e10], np.float32),
        struct.pack(">II", 0x00000D01, 3) + struct.pack(">3f", 0.5, -1.25, 3e10),
    ),
]
_HAND_BUILT_IDS = ["uint8-images", "uint8-labels", "int32", "float32"]


@pytest.mark.parametrize("array,expected", _HAND_BUILT_IDX, ids=_HAND_BUILT_IDS)
def test_write_idx_writes_the_format_byte_for_byte(tmp_path, array, expected):
    write_idx(tmp_path / "x.idx", array)
    assert (tmp_path / "x.idx").read_bytes() == expected
    write_idx(tmp_path / "x.idx.gz", array)
    compressed = (tmp_path / "x.idx.gz").read_bytes()
    assert compressed[:2] == b"\x1f\x8b" and gzip.decompress(compressed) == expected


@pytest.mark.parametrize("array,expected", _HAND_BUILT_IDX, ids=_HAND_BUILT_IDS)
def test_read_idx_reads_hand_built_files(tmp_path, array, expected):
    (tmp_path / "x.idx").write_bytes(expected)
    (tmp_path / "x.idx.gz").write_bytes(gzip.compress(expected))
    content_hash = hashlib.sha256(expected).hexdigest()  # of the uncompressed bytes
    for name in ("x.idx", "x.idx.gz"):
        got = read_idx(tmp_path / name, content_hash)
        assert got.dtype == array.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, array)
    with pytest.raises(
        DataError, match=rf"x.idx.gz: sha256 of the uncompressed content is {content_hash}"
    ):
        read_idx(tmp_path / "x.idx.gz", "0" * 64)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir_reads_hand_built_files(tmp_path, monkeypatch, synthetic_mnist, gz):
    _trust(monkeypatch, synthetic_mnist.sha256)
    m = load_idx_dir(synthetic_mnist.write(tmp_path, gz=gz))  # verified with their own hashes
    for key, want in synthetic_mnist.arrays.items():
        np.testing.assert_array_equal(getattr(m, key), want, err_msg=key)
        assert getattr(m, key).dtype == np.uint8


def test_idx_dir_with_raw_and_gzipped_files_mixed(tmp_path, monkeypatch, synthetic_mnist):
    _trust(monkeypatch, synthetic_mnist.sha256)
    for name, raw in synthetic_mnist.raw.items():
        if name.startswith("t10k"):
            (tmp_path / name).write_bytes(raw)
        else:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
    m = load_idx_dir(tmp_path)
    for key, want in synthetic_mnist.arrays.items():
        np.testing.assert_array_equal(getattr(m, key), want, err_msg=key)


def _damaged(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def test_bad_magic(tmp_path):
    raw = data.encode_idx(np.zeros((2, 3), np.uint8))
    path = _damaged(tmp_path, "f.idx", b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match=r"f.idx: not an IDX file \(bad magic number 0x01020802\)"):
        read_idx(path)


def test_truncated_file(tmp_path):
    raw = data.encode_idx(np.zeros((10, 28, 28), np.uint8))
    path = _damaged(tmp_path, "f.idx", raw[:-100])
    with pytest.raises(
        DataError,
        match=r"f.idx: truncated: the header promises shape "
        r"\(10, 28, 28\) \(7856 bytes\) but the file has 7756",
    ):
        read_idx(path)


def test_header_that_lies_about_its_size(tmp_path):
    raw = bytearray(data.encode_idx(np.zeros((10, 28, 28), np.uint8)))
    raw[4:8] = (8).to_bytes(4, "big")  # claims 8 images, 10 follow
    path = _damaged(tmp_path, "f.idx", bytes(raw))
    with pytest.raises(
        DataError,
        match=r"f.idx: the header says shape \(8, 28, 28\) "
        r"\(6288 bytes\) but the file has 1568 more bytes",
    ):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    raw = gzip.compress(data.encode_idx(RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = _damaged(tmp_path, "f.idx.gz", raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"f.idx.gz: truncated gzip stream"):
        read_idx(path)


def test_mismatched_counts(tmp_path):
    folder = _fake_mnist_dir(tmp_path, n_test=4)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte.gz has 4 images but "
        r".*t10k-labels-idx1-ubyte.gz has 3 labels",
    ):
        load_idx_dir(folder)  # structure is checked before hashes


def test_label_of_10(tmp_path):
    folder = _fake_mnist_dir(tmp_path, labels=[1, 2, 10, 3])
    with pytest.raises(
        DataError,
        match=r"t10k-labels-idx1-ubyte.gz: label 10 at index 2 "
        r"is outside 0..9",
    ):
        load_idx_dir(folder)  # structure is checked before hashes


def test_wrong_hash_names_file_and_both_hashes(tmp_path):
    folder = _fake_mnist_dir(tmp_path)
    with pytest.raises(DataError) as err:
        load_idx_dir(folder)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz: sha256 of the uncompressed content is " in message
    assert data.CANONICAL_SHA256["train-images-idx3-ubyte"] in message
    assert "--no_verify" in message and "\n" not in message


def test_missing_file_and_folder(tmp_path):
    folder = _fake_mnist_dir(tmp_path)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing train-labels-idx1-ubyte.gz"):
        load_idx_dir(folder, verify=False)
    with pytest.raises(DataError, match=r"nowhere: data directory not found"):
        load_idx_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------- real files


def test_real_mnist_files(mnist_dir):
    contents = {
        name: gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
        for name in MNIST_NAMES.values()
    }
    real = {name: hashlib.sha256(raw).hexdigest() for name, raw in contents.items()}
    assert real == data.CANONICAL_SHA256
    m = load_idx_dir(mnist_dir, verify=False)  # the hashes are checked above
    assert m.train_images.shape == (60000, 28, 28) and m.test_images.shape == (10000, 28, 28)
    assert m.train_labels.shape == (60000,) and m.test_labels.shape == (10000,)
    x = m.train_images
    assert round(x.mean(dtype=np.float64) / 255, 4) == 0.1307
    assert round(x.std(dtype=np.float64) / 255, 4) == 0.3081
    assert list(m.train_labels[:5]) == [5, 0, 4, 1, 9]
    assert list(m.test_labels[:5]) == [7, 2, 1, 0, 4]


def test_bundled_sample_is_the_head_of_real_mnist(mnist_dir):
    sample = data.load_sample()
    assert data.SAMPLE_PATH.stat().st_size < 1_000_000
    assert (data.SAMPLE_PATH.parent / "README.md").read_text().count("CC BY-SA 3.0") >= 1
    real = load_idx_dir(mnist_dir).head(*data.SAMPLE_SIZES)
    for got, want in zip(sample, real, strict=True):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- downloads


class _Handler(BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    truncate = False
    status = 200  # any other: every request is answered with this error
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        self.requests.append(self.path)
        body = self.files.get(self.path.rsplit("/", 1)[-1])
        if self.status != 200 or body is None:
            self.send_error(404 if self.status == 200 else self.status)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.truncate else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server serving synthetic MNIST ``.gz`` files whose own hashes stand
    in for the canonical ones; yields its handler class (``files``, ``truncate``,
    ``status``, ``requests``), its ``url`` and the ``mnist`` it serves."""
    mnist = make_synthetic_mnist(n_train=160)  # a training-image file of over 100 kB
    _trust(monkeypatch, mnist.sha256)
    handler = type(
        "Handler",
        (_Handler,),
        {"files": mnist.gz(), "truncate": False, "status": 200, "requests": []},
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield SimpleNamespace(
        handler=handler, url=f"http://127.0.0.1:{httpd.server_address[1]}/mnist/", mnist=mnist
    )
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """The seconds the download back-off asks to sleep, recorded instead of slept."""
    asked = []
    monkeypatch.setattr(download.time, "sleep", asked.append)
    return asked


def _cache_files(cache: Path):
    folder = cache / "mnist"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


def test_download_happy_path_through_env_vars(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAE_JAX_MNIST_MIRROR", server.url)
    monkeypatch.setenv("SAE_JAX_CACHE_DIR", str(tmp_path / "cache"))
    logs = []
    m = load_mnist("download", log=logs.append)
    progress = capsys.readouterr().err.splitlines()  # not a terminal: one line per file
    files = server.handler.files
    assert 100_000 <= len(files["train-images-idx3-ubyte.gz"]) < 150_000
    assert progress == [
        "  downloaded train-images-idx3-ubyte.gz (0.1 MB)",
        *(
            f"  downloaded {name} ({len(files[name]) / 1000:.1f} kB)"
            for name in (
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            )
        ),
    ]
    for key, want in server.mnist.arrays.items():
        np.testing.assert_array_equal(getattr(m, key), want, err_msg=key)
    cache = tmp_path / "cache" / "mnist"
    assert _cache_files(tmp_path / "cache") == sorted(files)
    assert all((cache / name).read_bytes() == body for name, body in files.items())
    assert logs == [f"MNIST: IDX files in the cache {cache} (downloaded where missing)"]
    # auto now finds the cache before trying the network
    logs.clear()
    load_mnist("auto", mirror="http://127.0.0.1:9/", log=logs.append)
    assert logs == [f"MNIST: IDX files in {cache}"]
    assert len(server.handler.requests) == 4


def test_download_of_corrupted_file_leaves_nothing(server, tmp_path):
    name = "train-labels-idx1-ubyte"
    raw = bytearray(server.mnist.raw[name])
    raw[-1] = (raw[-1] + 1) % 10  # still a valid label file, but not the expected one
    served = gzip.compress(bytes(raw), mtime=0)  # a fixed header, so it compares byte for byte
    server.handler.files = {**server.handler.files, f"{name}.gz": served}
    with pytest.raises(
        DataError,
        match=rf"{name}.gz: sha256 of the downloaded content is [0-9a-f]{{64}}, "
        rf"expected {server.mnist.sha256[name]}; nothing was saved",
    ):
        data.download_mnist(tmp_path, server.url, progress=False, retries=1)
    assert _cache_files(tmp_path) == ["train-images-idx3-ubyte.gz"]  # the one before it
    # with verification off the same file is accepted
    data.download_mnist(tmp_path, server.url, progress=False, retries=1, verify=False)
    assert (tmp_path / "mnist" / f"{name}.gz").read_bytes() == served


def test_connection_closed_mid_file_leaves_no_partial_file(server, tmp_path, sleeps):
    server.handler.truncate = True
    with pytest.raises(
        DataError,
        match=r"cannot download .*train-images-idx3-ubyte.gz \(the connection closed "
        r"\d+ bytes before the end of the file\)",
    ):
        data.download_mnist(tmp_path, server.url, progress=False, retries=2)
    assert len(server.handler.requests) == 2 and sleeps == [0.5]
    assert _cache_files(tmp_path) == []


def test_back_off_keeps_a_refused_download_under_two_seconds(tmp_path, sleeps):
    # README: "With no network a download fails in under 2 seconds and says to use
    # --data_dir": 3 attempts in all, waiting 0.5 s, then 1 s.
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_mnist(
            "download",
            cache_dir=tmp_path,
            mirror=_refused_url(),
            progress=False,
            log=lambda s: None,
        )
    attempts = time.perf_counter() - start  # without the sleeps
    assert sleeps == [0.5, 1.0]
    assert attempts + sum(sleeps) < 2
    assert "Connection refused" in str(err.value) and "--data_dir" in str(err.value)
    assert _cache_files(tmp_path) == []


def test_server_errors_are_retried_with_the_same_back_off(server, tmp_path, sleeps):
    server.handler.status = 503
    with pytest.raises(DataError, match=r"HTTP 503"):
        data.download_mnist(tmp_path, server.url, progress=False)
    assert len(server.handler.requests) == 3 and sleeps == [0.5, 1.0]
    assert _cache_files(tmp_path) == []


def test_404_is_not_retried(server, tmp_path, sleeps):
    server.handler.files = {}
    with pytest.raises(DataError, match=r"HTTP 404"):
        data.download_mnist(tmp_path, server.url, progress=False)
    assert server.handler.requests == ["/mnist/train-images-idx3-ubyte.gz"] and sleeps == []


# --------------------------------------------------------------------------- sources


def test_auto_prefers_data_dir_then_sample(tmp_path, monkeypatch, synthetic_mnist):
    _trust(monkeypatch, synthetic_mnist.sha256)
    folder = synthetic_mnist.write(tmp_path / "idx")
    logs = []
    m = load_mnist("auto", folder, need=(1000, 500), log=logs.append)
    assert logs == [f"MNIST: IDX files in {folder}"]
    np.testing.assert_array_equal(m.test_images, synthetic_mnist.arrays["test_images"])
    logs.clear()
    m = load_mnist("auto", tmp_path / "empty", need=(1000, 500), log=logs.append)
    assert logs == [
        f"MNIST: no IDX files in {tmp_path / 'empty'}, looking elsewhere",
        "MNIST: bundled sample mnist_sample.npz",
    ]
    assert (len(m.train_images), len(m.test_images)) == data.SAMPLE_SIZES == (1000, 500)
    assert list(m.train_labels[:5]) == [5, 0, 4, 1, 9]  # the head of MNIST
    assert list(m.test_labels[:5]) == [7, 2, 1, 0, 4]


def test_unknown_source():
    with pytest.raises(DataError, match=r"unknown data source 'ftp'; choose from auto, idx"):
        load_mnist("ftp")


def test_tfds_source_offline():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):  # its own random records
        m = load_mnist("tfds", log=lambda s: None)
    assert m.train_images.shape == (12, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_labels.shape == (12,) and m.test_labels.dtype == np.uint8
    assert m.train_labels.max() <= 9 and m.source == "tensorflow-datasets"


def test_tfds_train_and_test_splits_land_in_their_own_arrays():
    tfds = pytest.importorskip("tensorflow_datasets")
    mnist = make_synthetic_mnist(n_train=5, n_test=3)  # tells the splits apart

    def records(split):
        images, labels = mnist.arrays[f"{split}_images"], mnist.arrays[f"{split}_labels"]
        # as tensorflow-datasets' mnist gives them: image [28, 28, 1], label int64
        return [
            {"image": x[..., None], "label": np.int64(y)}
            for x, y in zip(images, labels, strict=True)
        ]

    def as_data_source(builder, split, **kwargs):
        return [records(str(s)) for s in split] if isinstance(split, list) else records(split)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        m = load_mnist("tfds", log=lambda s: None)
    for key, want in mnist.arrays.items():
        np.testing.assert_array_equal(getattr(m, key), want, err_msg=key)
        assert getattr(m, key).dtype == np.uint8


def test_tfds_missing_is_a_data_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tfds)
    with pytest.raises(DataError, match=r"tensorflow-datasets is not installed"):
        data.load_tfds()
    assert not data.tfds_prepared()


def test_data_paths_may_be_relative_or_start_with_home(tmp_path, monkeypatch):
    _fake_mnist_dir(tmp_path / "home" / "mnist")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "home")
    for given in ("~/mnist", "mnist", "../home/mnist"):
        mnist = load_mnist("idx", given, verify=False, log=lambda line: None)
        assert mnist.source == f"IDX files in {tmp_path}/home/mnist", given
        assert mnist.train_images.shape == (6, 28, 28)


# --------------------------------------------------------------------------- other datasets


def test_published_hashes_are_tensorflow_datasets_own():
    tfds = pytest.importorskip("tensorflow_datasets")
    lists = Path(tfds.__file__).parent / "url_checksums"
    for name, spec in data.IDX_DATASETS.items():
        rows = [line.split("\t") for line in (lists / f"{name}.txt").read_text().splitlines()]
        published = {Path(url).name: sha for url, _size, sha, *_ in rows if url}
        assert spec.gz_sha256 == (name != "mnist")  # MNIST's are of the uncompressed files
        if spec.gz_sha256:
            assert {f"{stem}.gz": sha for stem, sha in spec.sha256.items()} == published
        urls = {url.rsplit("/", 1)[0] + "/" for url, *_ in rows}
        assert urls == {spec.mirror}, name


def _gz_hashes(files: dict) -> dict:
    return {
        name.removesuffix(".gz"): hashlib.sha256(raw).hexdigest() for name, raw in files.items()
    }


def test_fashion_mnist_downloads_into_its_own_cache_verified_by_its_gz_hashes(
    server, tmp_path, monkeypatch
):
    _trust(monkeypatch, _gz_hashes(server.handler.files), "fashion_mnist")
    logs = []
    got = data.load_dataset(
        "fashion_mnist",
        "download",
        cache_dir=tmp_path,
        mirror=server.url,
        log=logs.append,
        progress=False,
    )
    for key, want in server.mnist.arrays.items():
        np.testing.assert_array_equal(getattr(got, key), want, err_msg=key)
    folder = tmp_path / "fashion_mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(server.handler.files)
    assert logs == [f"Fashion-MNIST: IDX files in the cache {folder} (downloaded where missing)"]
    # "auto" finds the cache (nothing is fetched again), and a local folder verifies too
    server.handler.requests.clear()
    again = data.load_dataset("fashion_mnist", cache_dir=tmp_path, log=logs.append)
    np.testing.assert_array_equal(again.train_images, got.train_images)
    assert server.handler.requests == []


def test_a_changed_fashion_mnist_file_is_refused_and_nothing_is_kept(server, tmp_path, monkeypatch):
    _trust(monkeypatch, _gz_hashes(server.handler.files), "fashion_mnist")
    name = "t10k-labels-idx1-ubyte.gz"
    # the same content in another gzip wrapper: the published hash is of the file itself
    content = gzip.decompress(server.handler.files[name])
    server.handler.files = {**server.handler.files, name: gzip.compress(content, mtime=1)}
    with pytest.raises(DataError, match=rf"{name}: sha256 of the downloaded file is .*nothing"):
        data.load_dataset(
            "fashion_mnist",
            "download",
            cache_dir=tmp_path,
            mirror=server.url,
            progress=False,
            log=lambda s: None,
        )
    assert name not in [p.name for p in (tmp_path / "fashion_mnist").iterdir()]


def test_a_raw_file_of_a_gz_verified_dataset_needs_no_verify(tmp_path, monkeypatch):
    folder = _fake_mnist_dir(tmp_path / "kmnist", gz=False)
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: KMNIST's published sha256 "
        r"is of train-images-idx3-ubyte.gz; keep the .gz file",
    ):
        data.load_dataset("kmnist", "idx", folder, log=lambda s: None)
    got = data.load_dataset("kmnist", "idx", folder, verify=False, log=lambda s: None)
    assert got.train_images.shape == (6, 28, 28)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: sha256 of the file is"):
        data.load_dataset("kmnist", "idx", _fake_mnist_dir(tmp_path / "gz"), log=lambda s: None)


@pytest.mark.parametrize(
    "dataset,source,message",
    [
        ("emnist", "auto", "--dataset=emnist: choose from mnist, fashion_mnist, kmnist"),
        ("kmnist", "sample", "the bundled sample is MNIST's, not kmnist"),
    ],
)
def test_unknown_dataset_or_no_sample(dataset, source, message):
    with pytest.raises(DataError, match=message):
        data.load_dataset(dataset, source, log=lambda s: None)


def test_any_tfds_image_dataset_by_name():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):  # its own random records, of cifar10's form
        got = data.load_dataset("cifar10", "tfds", log=lambda s: None)
    assert got.train_images.shape == (6, 32, 32, 3) and got.train_images.dtype == np.uint8
    assert got.test_labels.shape == (6,) and got.source == "tensorflow-datasets"

    def text_records(builder, split, **kwargs):  # a dataset of another kind
        return [[{"text": b"good", "label": 1}] for _ in split]

    not_images = pytest.raises(DataError, match="tensorflow-datasets imdb_reviews: not an image")
    with tfds.testing.mock_data(as_data_source_fn=text_records), not_images:
        data.load_dataset("imdb_reviews", "tfds", log=lambda s: None)
