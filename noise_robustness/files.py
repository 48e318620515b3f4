"""Files a study keeps: written atomically (a crash leaves the old file or the new one), read with a clear error."""

import csv
import fcntl
import hashlib
import io
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable
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


# A temporary file of a write under way: hidden, named after its file, the process and the machine writing it
TEMPORARY = re.compile(r"^\..+\.tmp\.(?P<pid>\d+)@(?P<host>.+)\.[^.]+$")


def temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp.{os.getpid()}@{socket.gethostname()}."


def remove_interrupted_writes(folder: Path) -> None:
    """Removes, anywhere under ``folder``, the temporary files of writes that this machine's processes began and
    never finished (killed mid-write: SIGKILL, a power cut); those of live processes and other machines stay."""
    host = socket.gethostname()
    for path in folder.rglob(".*.tmp.*@*"):
        match = TEMPORARY.match(path.name)
        if match and match["host"] == host and not process_alive(int(match["pid"])) and not being_written(path):
            path.unlink(missing_ok=True)


def being_written(path: Path) -> bool:
    """Whether a writer holds ``path``'s lock (``write_atomic`` holds its temporary's while it writes): a writer in
    another pid namespace of a machine of the same name, say."""
    try:
        with open(path, "rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # gone meanwhile: nothing to remove
        return True
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


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

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
    fcntl.flock(fd, fcntl.LOCK_EX)  # while it is written (``being_written``); released when it is closed
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
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


class DamagedFile(ValueError):
    """A saved file that is not whole (cut short, emptied, overwritten): never read as numbers. Its message names the
    file and what is wrong; the reader redoes its part, or refuses with the remedy where redoing is unsafe."""


def integers(text: str) -> list[int]:
    """A field of integers separated by spaces (``"0 3 97"``), as a csv type."""
    return [int(value) for value in text.split(" ")]


def read_rows(path: Path, columns: dict[str, Callable[[str], object]]) -> list[dict[str, str]]:
    """The rows of a csv file written by ``csv_text(columns, ...)``, as text, checked whole first: its header is
    ``columns``, it ends with a line end (every row is written with one, so a cut anywhere but at a row's end shows),
    every row has every field, and each field reads as its column's type (``int``, ``float``, ``str``, ``integers``).
    A file cut at a row's end holds whole rows: a prefix of what was written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DamagedFile: naming ``path`` and what is wrong.
    """
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DamagedFile(f"{path} is damaged: it is not text") from None
    if not text.endswith("\n"):
        raise DamagedFile(f"{path} is damaged: {'it is empty' if not text else 'its last row is cut short'}")
    try:
        lines = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error as err:
        raise DamagedFile(f"{path} is damaged: {err}") from None
    if lines[0] != list(columns):
        raise DamagedFile(f"{path} is damaged: its header is not {','.join(columns)}")
    for number, fields in enumerate(lines[1:], 2):
        if len(fields) != len(columns):
            raise DamagedFile(f"{path} is damaged: line {number} has {len(fields)} fields, not {len(columns)}")
        for (name, kind), value in zip(columns.items(), fields):
            try:
                kind(value)
            except (ValueError, TypeError):
                raise DamagedFile(f"{path} is damaged: line {number}'s {name} is {value!r}") from None
    return [dict(zip(columns, fields)) for fields in lines[1:]]


def read_record(path: Path, like: dict) -> dict:
    """An evaluation's record (``certify.yaml``, ``attack.yaml``), checked whole: a mapping with ``like``'s keys, each
    value of the type of ``like``'s. Its keys are written sorted, so a cut anywhere leaves its last key missing or
    of another type (``subset_seed: `` reads as null).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DamagedFile: naming ``path`` and what is wrong.
    """
    try:
        record = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} is damaged: it is not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict) or set(record) != set(like):
        raise DamagedFile(f"{path} is damaged: it does not hold every key of an evaluation's record")
    if wrong := [key for key in like if like[key] is not None and type(record[key]) is not type(like[key])]:
        raise DamagedFile(f"{path} is damaged: its {', '.join(wrong)} is not a {type(like[wrong[0]]).__name__}")
    return record


def csv_text(columns: Iterable[str], rows: list[dict]) -> str:
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
