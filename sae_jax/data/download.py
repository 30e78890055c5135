"""Verified downloads of IDX datasets into a cache, with retries and no partial files."""

from __future__ import annotations

import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_jax.data.idx import (
    MNIST_FILES,
    _check_sha256,
    _find,
    _uncompressed,
    idx_dataset,
    parse_idx,
)
from sae_jax.errors import DataError

MIRROR_ENV = "SAE_JAX_MNIST_MIRROR"
CACHE_ENV = "SAE_JAX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$SAE_JAX_CACHE_DIR``, else ``~/.cache/sae_jax``; each dataset goes in its own
    folder there (``mnist/``, ``fashion_mnist/``, ...)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sae_jax")


def dataset_cache_dir(
    cache_dir: str | os.PathLike[str] | None = None, dataset: str = "mnist"
) -> Path:
    """Where downloaded files of ``dataset`` live: ``<cache_dir or default>/<dataset>``."""
    return Path(cache_dir or default_cache_dir()) / dataset


def mnist_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded MNIST files live: ``<cache_dir or default_cache_dir()>/mnist``."""
    return dataset_cache_dir(cache_dir, "mnist")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _progress_printer(name: str) -> Callable[[int, int, bool], None]:
    """A progress bar on a terminal's stderr; otherwise one line per finished file."""
    stream = sys.stderr
    tty = stream.isatty()

    def show(done: int, total: int, finished: bool) -> None:
        if tty:
            bar = ""
            if total:
                filled = 30 * done // total
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}% "
            stream.write(f"\r  {name:<28} {bar}{_size(done)}" + ("\n" if finished else ""))
        elif finished:
            stream.write(f"  downloaded {name} ({_size(done)})\n")
        stream.flush()

    return show


def _fetch(url: str, dest, timeout: float, progress) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "sae_jax"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 16):
            dest.write(chunk)
            done += len(chunk)
            progress(done, total, False)
        if total and done != total:
            raise http.client.IncompleteRead(b"", total - done)
        progress(done, total, True)


def download_file(
    url: str,
    path: Path,
    expected_sha256: str | None,
    *,
    timeout: float = 10.0,
    retries: int = 3,
    progress: bool = True,
    gz_sha256: bool = False,
) -> None:
    """Download ``url`` to ``path`` via a temporary file, verify it, then rename it.

    The content (gunzipped) must parse as IDX and, when ``expected_sha256`` is given,
    match that hash (with ``gz_sha256``, the hash of the file as downloaded). On any
    failure nothing is left at ``path`` or beside it.
    Connection errors, timeouts and 5xx answers are retried ``retries`` times in
    all, with a short back-off; other HTTP errors are not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    show = _progress_printer(path.name) if progress else (lambda *a: None)
    last_error = "no attempt made"
    for attempt in range(retries):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f, timeout, show)
            downloaded = Path(tmp).read_bytes()
            raw = _uncompressed(downloaded, url)
            if expected_sha256 is not None:
                what = "downloaded file" if gz_sha256 else "downloaded content"
                checked = downloaded if gz_sha256 else raw
                _check_sha256(checked, expected_sha256, url, what, "; nothing was saved")
            parse_idx(raw, url)
            os.replace(tmp, path)
            return
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code} {e.reason}"
            if e.code < 500:
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(e, http.client.IncompleteRead):
                reason = f"the connection closed {e.expected} bytes before the end of the file"
            last_error = str(reason)
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DataError(
        f"cannot download {url} ({last_error}); with no network, point --data_dir at a "
        f"folder holding the four IDX files"
    )


def download_idx(
    dataset: str = "mnist",
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    *,
    verify: bool = True,
    timeout: float = 10.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Fetch the four ``.gz`` files of ``dataset`` (see ``IDX_DATASETS``) that are not
    yet in the cache.

    Args:
      cache_dir: the cache root (default ``default_cache_dir()``); files go to
        ``<cache_dir>/<dataset>``.
      mirror: base URL (default: the dataset's, the one tensorflow-datasets uses; for
        MNIST ``$SAE_JAX_MNIST_MIRROR`` first).
      verify: check the published hashes.

    Returns:
      The folder holding the four files.
    """
    spec = idx_dataset(dataset)
    folder = dataset_cache_dir(cache_dir, dataset)
    env = os.environ.get(MIRROR_ENV) if dataset == "mnist" else None
    base = (mirror or env or spec.mirror).rstrip("/") + "/"
    for stem in MNIST_FILES.values():
        if _find(folder, stem) is None:
            download_file(
                base + f"{stem}.gz",
                folder / f"{stem}.gz",
                spec.sha256[stem] if verify else None,
                timeout=timeout,
                retries=retries,
                progress=progress,
                gz_sha256=spec.gz_sha256,
            )
    return folder


def download_mnist(
    cache_dir: str | os.PathLike[str] | None = None, mirror: str | None = None, **options: Any
) -> Path:
    """``download_idx`` of MNIST: the four ``.gz`` files into ``<cache_dir>/mnist``."""
    return download_idx("mnist", cache_dir, mirror, **options)
