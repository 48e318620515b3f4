"""Files a study keeps: written atomically (a crash leaves the old file or the new one), read with a clear error."""

import csv
import fcntl
import hashlib
import io
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import yaml


def check_writable(folder: str | Path, argument: str) -> None:
    """Raises ValueError unless ``folder`` exists as a writable folder or could be created, creating nothing."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Expected `{argument}` to be a folder this user can write, but {existing} is not")


class FailedWrites:
    """A binary file that keeps the ``OSError`` of a write that failed (a full disk), for a writer that reports
    it as an error of its own."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Writes ``content`` to ``path`` atomically (a crash leaves the old file or the new one), readable as umask
    allows. ``content`` may be a function that writes to the open file (``torch.save``): nothing is held in memory
    whole first."""
    if callable(content):
        write = content
    else:
        data = content.encode() if isinstance(content, str) else content

        def write(file: BinaryIO) -> None:
            file.write(data)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; colleagues in a shared folder should read them
    try:
        with os.fdopen(fd, "wb") as f:
            written = FailedWrites(f)
            try:
                write(written)
            except Exception:
                if written.error is None:
                    raise
                raise written.error from None  # torch.save turns a full disk into an error of its own
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)  # a failed write leaves no temporary file behind
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # name the file written
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    os.replace(tmp, path)


def create_exclusive(path: Path, text: str) -> bool:
    """Writes ``text`` to ``path`` whole and only if ``path`` does not exist yet; returns whether it did.

    The file appears complete or not at all (a hard link of a finished temporary file), and of two
    processes creating it at the same instant exactly one succeeds.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write_atomic(Path(tmp), text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def read_options(path: Path) -> dict:
    """The options recorded in a study's ``study.yaml`` or ``config.yaml``.

    Raises:
        ValueError: naming the file, when it is not YAML or holds no mapping of options.
    """
    try:
        options = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is damaged: it is not YAML ({str(err).splitlines()[0]}); {RESTORE}") from None
    if not isinstance(options, dict) or not options:
        raise ValueError(f"{path} is damaged: it holds {type(options).__name__}, not the study's options; {RESTORE}")
    return options


RESTORE = "restore it from a copy, or use a new --out"


def csv_text(columns: list[str], rows: list[dict]) -> str:
    """``rows`` as csv, ``columns`` in order (other keys left out, missing ones empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class Lock:
    """An exclusive lock of this process on ``path`` (created if missing), or ``held`` False if another holds it.

    Two claims: ``flock`` on the file, which holds across the machines of a shared file system, and an abstract
    socket named after the file's absolute path, which holds on this machine even if the file is deleted. Both end
    with the process; ``release`` ends them sooner.
    """

    def __init__(self, path: Path):
        self.file = open(path, "a")  # noqa: SIM115 (held until released)
        self.claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.claim.bind(f"\0noise_robustness/{key}")  # gone when it is closed
            self.held = True
        except OSError:  # held by another command (flock's BlockingIOError, bind's address in use)
            self.release()
            self.held = False

    def release(self) -> None:
        self.file.close()
        self.claim.close()
