"""MNIST from the files shipped in this package: checked, unpacked once, loaded as whole tensors.

The package carries the four gzip files (``assets/mnist``, with their provenance and licence) so the
tool runs offline. Before first use each file is decompressed into torchvision's raw layout
(``<data_dir>/MNIST/raw/``) and every raw file is checked against its SHA-256 before it is read,
so a truncated or corrupt file is an error naming it, never training on garbage.
"""

import functools
import gzip
import hashlib
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from noise_robustness.files import write_atomic

ASSETS = Path(__file__).parents[1] / "assets" / "mnist"
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataFileError(RuntimeError):
    """A data file is missing, unreadable or not the expected MNIST file."""


def expected_sha256() -> dict[str, str]:
    """The SHA-256 of each decompressed file, from the shipped ``SHA256SUMS``."""
    lines = (ASSETS / "SHA256SUMS").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(name: str, raw_dir: Path) -> None:
    """Decompresses the shipped ``name.gz`` into ``raw_dir`` atomically (``files.write_atomic``)."""
    source = ASSETS / f"{name}.gz"
    if not source.is_file():
        raise DataFileError(f"MNIST file {source} is missing from the package; reinstall noise_robustness")

    def decompress(out) -> None:
        with gzip.open(source) as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(raw_dir / name, decompress)
    except (OSError, EOFError) as err:
        raise DataFileError(f"could not unpack {source} into {raw_dir} (is `data_dir` writable?): {err}") from err


_verified: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) when its SHA-256 last matched


def _check(path: Path, digest: str) -> None:
    stat = path.stat()
    if _verified.get(path) == (stat.st_size, stat.st_mtime_ns):
        return  # unchanged since it was hashed in this process: a sweep hashes MNIST once
    if _sha256(path) != digest:
        raise DataFileError(
            f"MNIST file {path} is corrupt or truncated (its SHA-256 is not the one in "
            f"{ASSETS / 'SHA256SUMS'}); delete it and run again to unpack a fresh copy"
        )
    _verified[path] = (stat.st_size, stat.st_mtime_ns)


def prepare(data_dir: str | Path, download: bool = False) -> Path:
    """Makes sure ``<data_dir>/MNIST/raw`` holds the four verified MNIST files; returns ``data_dir``.

    Missing files are unpacked from the package (or downloaded by torchvision if ``download``).
    Raises:
        DataFileError: a file is corrupt, truncated, of the wrong content, or cannot be written.
    """
    data_dir = Path(data_dir)
    raw_dir = data_dir / "MNIST" / "raw"
    sums = expected_sha256()
    for name in RAW_FILES:
        path = raw_dir / name
        if not path.exists():
            if download:
                MNIST(data_dir, download=True)
            else:
                _unpack(name, raw_dir)
        _check(path.absolute(), sums[name])
    return data_dir


@functools.lru_cache(maxsize=2)
def load(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one MNIST file pair as ``(images, labels)``: uint8 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Cached per process, so a sweep reads and decodes MNIST once, not once per run.
    """
    prepare(data_dir)
    dataset = MNIST(data_dir, train=train, download=False)
    return dataset.data.unsqueeze(1), dataset.targets
