"""A study's folder: its members, its identity, which members are finished, locks, result files and the gather.

A study is one network per (noise level σ, seed), its *members*. Its folder ``out`` holds:

- ``study.yaml``: the study's identity, every option that decides a result; a command with other
  options is refused, naming each key that differs;
- ``config.yaml``: the full resolved config of the last command that trained in it;
- ``members/sigma=<σ>/seed=<s>.json`` (``impulse=<severity>/...`` for other corruptions): one result file per
  finished member, written atomically, and
  ``seed=<s>.pt`` beside it, the member's final weights (written first);
- ``locks/``: one lock per member in training (``flock``), so two commands never train the same member;
- ``checkpoints/<group>/``: the checkpoint of a group of members trained together, to resume it;
- ``results.csv`` and ``robustness.csv``: the members' results, gathered.

This module is built from plain values (a dict of options, a list of members, a path) and imports
neither Lightning nor jsonargparse: ``sweep.py`` runs a study in it, ``cli.py`` parses its options.
"""

import csv
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

import yaml

from noise_robustness.corruptions import GAUSSIAN, Corruption, build
from noise_robustness.noise import check_noise_scale

RESULT_COLUMNS = [
    "network", "corruption", "noise_scale", "seed", "noise_mode", "clip", "epochs",
    "train_acc", "val_acc", "train_loss", "val_loss", "study_id",
]  # fmt: skip
ROBUSTNESS_COLUMNS = [
    "network", "seed", "train_corruption", "train_noise_scale", "eval_corruption", "eval_noise_scale", "acc",
]  # fmt: skip
# Keys that name where or how a study runs, not what it computes; they may differ between commands.
NOT_IDENTITY = {
    "config", "out", "task", "gather", "compare", "ckpt_path",
    "scales", "seeds", "data.scales", "data.seeds", "model.scales", "model.seeds",
    # which members a study has (each member's file is its own): like --scales, more train only the new ones
    "corruptions", "data.corruptions", "model.corruptions",
    "data.data_dir", "data.download",
    "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes",  # tasks may run on GPUs, the gather on a CPU
    "model.graphed", "data.steps_per_batch",  # the same kernels, launched from CUDA graphs: the same numbers
}  # fmt: skip
UNSET = "<unset>"  # how a key that one of two configs lacks is shown
# Options added after studies were recorded without them: at this value (what those studies did) they are left
# out of the identity, so that those studies keep theirs.
ADDED_LATER = {"eval_corruptions": None, "model.dropout_masks": "per_member", "model.compiled": False}
# Options that decide how a study's arithmetic runs (other rounding, other dropout draws: numbers of their own,
# so part of the identity), not what it studies: a study compared beside another (`--compare`) may differ in
# them, and the summary says how each network was trained.
RECIPE = ("trainer.precision", "model.dropout_masks", "model.compiled")


def sigma_text(sigma: float) -> str:
    """σ as short text that reads back as the same float: ``0.5``, ``4``, ``0.1234567`` (never two σ, one text)."""
    short = f"{sigma:g}"
    return short if float(short) == sigma else repr(sigma)


@dataclass(frozen=True)
class Member:
    """One network of the study, trained on ``corruption`` at severity ``noise_scale`` (in the corruption's unit;
    Gaussian noise's σ by default). ``seed`` seeds its weights, shuffle order, dropout and corruption patterns.
    Severity 0 is the clean member, whatever the corruption: one per seed."""

    noise_scale: float
    seed: int
    corruption: Corruption = GAUSSIAN

    def __post_init__(self):
        if self.noise_scale == 0 and self.corruption != GAUSSIAN:
            object.__setattr__(self, "corruption", GAUSSIAN)  # clean is clean: one member, named as it always was

    @property
    def key(self) -> str:
        """``sigma`` for Gaussian noise (and clean), else the corruption's name: what names its folder."""
        return "sigma" if self.corruption == GAUSSIAN else self.corruption.name

    @property
    def name(self) -> str:
        """``sigma=0.5/seed=0``, ``impulse=0.1/seed=0``: how files, results and messages name it."""
        return f"{self.key}={sigma_text(self.noise_scale)}/seed={self.seed}"


def scales_of(members: list[Member]) -> list[float]:
    """The σ values of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.noise_scale for m in members))


def seeds_of(members: list[Member]) -> list[int]:
    """The seeds of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.seed for m in members))


def run_names(members: list[Member]) -> list[str]:
    """Each member's TensorBoard run, ``sigma=0.5/seed=0``, written so that they sort numerically as text.

    TensorBoard sorts runs as strings ("0.5/" before "0/", "1020" before "25.5"), so σ gets the
    study's widest integer part and most decimals ("sigma=0.0" ... "sigma=4.0"; "sigma=0025.5"),
    and seeds the widest seed.
    """
    decimals = max(-min(0, Decimal(sigma_text(m.noise_scale)).as_tuple().exponent) for m in members)
    sigmas = [f"{m.noise_scale:.{decimals}f}" for m in members]
    width = max(len(s) for s in sigmas)
    seed_width = max(len(str(m.seed)) for m in members)
    return [f"{m.key}={s.zfill(width)}/seed={m.seed:0{seed_width}d}" for s, m in zip(sigmas, members)]


def study_members(scales: list[float], seeds: list[int], corruptions: list | None = None) -> list[Member]:
    """Every (corruption, severity, seed) of the study, seed-major: members of one seed share a shuffle order and
    corruption patterns. Each corruption (``corruptions.build`` specs; default Gaussian noise alone) is trained at
    its own severities, else at ``scales``; severity 0 is one clean member per seed.

    Raises:
        ValueError: an empty or repeated list, a corruption named twice, or a severity outside its corruption's range.
    """
    if not scales:
        raise ValueError("Expected `scales` to be a non-empty list of noise levels, but got []")
    if not seeds:
        raise ValueError("Expected `seeds` to be a non-empty list of integers, but got []")
    scales = [check_noise_scale(s, "scales") for s in scales]
    for name, values in (("scales", scales), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"Expected `{name}` to hold each value once, but got {values}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected `seeds` to be integers >= 0, but got {seed!r}")
    trained = [Member(level, -1, c) for c in distinct(corruptions, "corruptions") for level in c.levels(scales)]
    grid = list(dict.fromkeys((m.noise_scale, m.corruption) for m in trained))  # clean once
    return [Member(level, seed, corruption) for seed in seeds for level, corruption in grid]


def distinct(corruptions: list | None, option: str) -> list[Corruption]:
    """The corruptions of ``option`` built from their specs (default: Gaussian noise alone), each named once.

    Raises:
        ValueError: an unknown corruption or a bad severity (naming it), or one named twice.
    """
    try:
        built = [GAUSSIAN] if corruptions is None else [build(spec) for spec in corruptions]
    except ValueError as err:
        raise ValueError(f"{err} (in `{option}`)") from None
    names = [c.name for c in built]
    if not built or len(set(names)) != len(names):
        raise ValueError(f"Expected `{option}` to name each corruption once, but got {names}")
    return built


def evaluations(eval_corruptions: list | None, scales: list[float], members: list[Member]) -> list[tuple]:
    """The (corruption, severity) cells every member is evaluated at, each once: by default each of the members'
    training corruptions at its severities; with ``eval_corruptions``, clean first, then each of them at its
    severities (its own, else ``scales``).

    Raises:
        ValueError: an unknown corruption, one named twice, or a severity outside its range, naming the option.
    """
    if eval_corruptions is None:
        order = list(dict.fromkeys(m.corruption for m in members))
        cells = sorted({(m.corruption, m.noise_scale) for m in members}, key=lambda c: (order.index(c[0]), c[1]))
    else:
        built = distinct(eval_corruptions, "eval_corruptions")
        cells = [(GAUSSIAN, 0.0)] + [(c, s) for c in built for s in sorted(c.levels(scales))]
    as_members = [Member(severity, 0, corruption) for corruption, severity in cells]  # clean is Gaussian at 0
    return list(dict.fromkeys((m.corruption, m.noise_scale) for m in as_members))


# -- options and files ---------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"data": {"clip": False}}`` -> ``{"data.clip": False}``; a ``class_path`` entry stays one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_of(resolved: dict) -> dict[str, object]:
    """The options of a resolved config (nested, as YAML) that decide a study's results, flat."""
    return {
        k: v
        for k, v in flatten(resolved).items()
        if k not in NOT_IDENTITY and not (k in ADDED_LATER and v == ADDED_LATER[k])
    }


def differences(recorded: dict, identity: dict, keys: set[str], now: str) -> list[str]:
    """``"key: <recorded> there, <identity> <now>"`` for each of ``keys`` whose values differ, sorted by key (an
    option an identity leaves out as ``ADDED_LATER`` shown at the value it stands for)."""
    recorded, identity = ADDED_LATER | recorded, ADDED_LATER | identity
    return [
        f"{k}: {recorded.get(k, UNSET)!r} there, {identity.get(k, UNSET)!r} {now}"
        for k in sorted(keys)
        if recorded.get(k, UNSET) != identity.get(k, UNSET)
    ]


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
        if isinstance(err, OSError) and err.filename is None:  # a write's error names no file: name this one
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- the study -----------------------------------------------------------------------------------


class StudyIncomplete(ValueError):
    """A gather found members without results."""


class Study:
    """A study's folder: which members it has, which are finished, and their results.

    Args:
        out: the folder.
        identity: every option that decides a result, flat (``study.yaml``).
        members: every member of the study.
        resolved: the command's full resolved config, nested (``config.yaml``).
    """

    def __init__(
        self,
        out: Path,
        identity: dict,
        members: list[Member],
        resolved: dict | None = None,
        cells: list[tuple] | None = None,
    ):
        self.out, self.identity, self.members, self.resolved = Path(out), identity, members, resolved or {}
        # (corruption, severity) each member is evaluated at; default: Gaussian noise at the members' σ
        self.cells = cells or evaluations(None, [], members)
        digest = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=4)
        self.study_id = digest.hexdigest()
        self._locks: list = []  # open lock files, held until this process ends

    def result_file(self, member: Member) -> Path:
        return self.out / "members" / f"{member.name}.json"

    def weights_file(self, member: Member) -> Path:
        """The member's final weights (``certify`` evaluates them), written just before its result file."""
        return self.result_file(member).with_suffix(".pt")

    def read_member(self, member: Member) -> dict | None:
        """A member's result file (``{"result": ..., "robustness": [...]}``); None if it has none or a damaged one."""
        try:
            record = json.loads(self.result_file(member).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # missing, unreadable, damaged
            return None
        return record if isinstance(record, dict) and {"result", "robustness"} <= set(record) else None

    def finished(self, member: Member) -> bool:
        """Whether ``member`` has a whole result file: only that marks a member finished."""
        return self.read_member(member) is not None

    def check(self) -> None:
        """Checks that ``out`` is a new folder or this study's, creating nothing.

        Raises:
            ValueError: ``out`` is a file, holds other files, or holds a study made with other options.
        """
        out = self.out
        if out.exists():
            if not out.is_dir():
                raise ValueError(f"Expected `out` to be a study folder, but {out} is a file")
            if not (out / "study.yaml").is_file() and any(out.iterdir()):
                raise ValueError(
                    f"Expected `out` to be a new folder or a study folder, but {out} holds other files and no "
                    "study.yaml; choose another --out"
                )
            if (out / "study.yaml").is_file():
                self.check_identity(read_options(out / "study.yaml"))
        check_writable(out, "out")

    def check_identity(self, recorded: dict) -> None:
        """Raises ValueError naming every option in which ``recorded`` (a ``study.yaml``) differs from this study."""
        differ = differences(recorded, self.identity, set(recorded) | set(self.identity), "now")
        if differ:
            raise ValueError(
                f"{self.out} holds a study made with other options ({'; '.join(differ)}). Its results cannot mix "
                "with this command's: use a new --out, or rerun with the options it was made with to resume "
                "or extend it"
            )

    def task_members(self, task: int | None) -> list[Member]:
        """The members of task ``task`` (one seed each: ``seeds[task]``), or every member for None.

        Raises:
            ValueError: ``task`` is not an index into the study's seeds.
        """
        if task is None:
            return list(self.members)
        seeds = seeds_of(self.members)
        if not 0 <= task < len(seeds):
            raise ValueError(
                f"Expected `task` to be in [0, {len(seeds)}), one task per seed of {seeds}, but got {task}"
            )
        return [m for m in self.members if m.seed == seeds[task]]

    def to_train(self, task: int | None, gather: bool) -> list[Member]:
        """The members a command with ``task`` and ``gather`` trains: its own members not finished yet."""
        return [] if gather else [m for m in self.task_members(task) if not self.finished(m)]

    def checkpoint_dir(self, to_train: list[Member]) -> Path:
        """One folder per group of members trained together: a rerun resumes the group it interrupted."""
        names = ",".join(m.name for m in to_train)
        return self.out / "checkpoints" / hashlib.blake2b(names.encode(), digest_size=6).hexdigest()

    def start(self, to_train: list[Member]) -> None:
        """Creates the folder, records the study, and locks the members ``to_train``.

        Raises:
            ValueError: another command is training one of them.
        """
        (self.out / "locks").mkdir(parents=True, exist_ok=True)
        # Exclusive: of two commands with other options that both found no study.yaml, one records its
        # study and the other is refused here, before it trains.
        if not create_exclusive(self.out / "study.yaml", yaml.safe_dump(self.identity, sort_keys=True)):
            self.check_identity(read_options(self.out / "study.yaml"))
        write_atomic(self.out / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        for member in to_train:
            lock = open(self.out / "locks" / f"{member.name.replace('/', ',')}.lock", "a")  # noqa: SIM115 (held until released)
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._locks += [lock, claim]
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # across the machines of a shared file system
                # and on this machine by name, so that deleting locks/ cannot let a second command in
                key = hashlib.blake2b(f"{self.out.resolve()}/{member.name}".encode(), digest_size=16).hexdigest()
                claim.bind(f"\0noise_robustness/{key}")  # an abstract socket: gone when it is closed
            except OSError:  # held by another command (flock's BlockingIOError, bind's address in use)
                self.release()  # this command trains none of them
                raise ValueError(
                    f"Another command is training member {member.name} of {self.out}; let it finish "
                    "(rerun this one afterwards to resume)"
                ) from None

    def release(self) -> None:
        """Releases the locks ``start`` took (a process that ends releases them too)."""
        for lock in self._locks:
            lock.close()
        self._locks.clear()

    def write_member(self, member: Member, result: dict, robustness: list[dict]) -> None:
        """Records ``member`` as finished: its final metrics and its accuracy at every σ, in one atomic file."""
        path = self.result_file(member)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"result": result, "robustness": robustness}, indent=1))

    def finished_runs(self) -> dict[Member, dict]:
        """Every member's result file, read once. Raises StudyIncomplete naming the members without one."""
        runs = {m: self.read_member(m) for m in self.members}
        missing = [m for m, run in runs.items() if run is None]
        if missing:
            damaged = [str(self.result_file(m)) for m in missing if self.result_file(m).exists()]
            raise StudyIncomplete(
                f"{len(missing)} of {len(self.members)} members of {self.out} have no results: "
                f"{', '.join(m.name for m in missing)}"
                + (f" (damaged result files: {', '.join(damaged)})" if damaged else "")
                + ". Train them (rerun the sweep, or its failed tasks), then gather again"
            )
        return runs

    def rows(self) -> tuple[list[dict], list[dict]]:
        """Every member's result row and its robustness rows (at the study's σ values), from the members' files.

        Raises:
            StudyIncomplete: members without results.
            ValueError: members written by another study (another ``study_id``), named.
        """
        runs = self.finished_runs()
        foreign = [m.name for m, run in runs.items() if run["result"].get("study_id") != self.study_id]
        if foreign:
            raise ValueError(
                f"{len(foreign)} member(s) of {self.out} were written by another study (not study_id "
                f"{self.study_id}): {', '.join(foreign)}. Their results cannot mix with this study's: move them "
                "out of members/ and rerun the same command to train them"
            )
        # files written before the corruption axis name none: theirs is Gaussian noise
        results = [
            {**run["result"], "corruption": run["result"].get("corruption", GAUSSIAN.name)} for run in runs.values()
        ]
        robustness = [
            {**row, **{k: row.get(k, GAUSSIAN.name) for k in ("train_corruption", "eval_corruption")}}
            for run in runs.values()
            for row in run["robustness"]
        ]
        # a member trained in a larger study holds cells this one leaves out
        cells = {(corruption.name, severity) for corruption, severity in self.cells}
        return results, [row for row in robustness if (row["eval_corruption"], row["eval_noise_scale"]) in cells]

    def gather(self) -> tuple[list[dict], list[dict]]:
        """Writes ``results.csv`` and ``robustness.csv`` from the members' files; returns their rows."""
        results, robustness = self.rows()
        write_atomic(self.out / "results.csv", csv_text(RESULT_COLUMNS, results))
        write_atomic(self.out / "robustness.csv", csv_text(ROBUSTNESS_COLUMNS, robustness))
        return results, robustness

    @classmethod
    def open(cls, out: Path) -> "Study":
        """The study in an existing folder, as its ``study.yaml`` and ``config.yaml`` record it.

        Raises:
            ValueError: ``out`` is no study folder, or one of its files is damaged.
        """
        if not (out / "study.yaml").is_file() or not (out / "config.yaml").is_file():
            raise ValueError(f"{out} is not a study folder (with study.yaml and config.yaml)")
        resolved = read_options(out / "config.yaml")
        scales, corruptions = resolved["scales"], resolved.get("corruptions")
        members = study_members(scales, resolved["seeds"], corruptions)
        cells = evaluations(resolved.get("eval_corruptions"), scales, members)
        return cls(out, read_options(out / "study.yaml"), members, resolved, cells)


def compared_rows(folder: Path, identity: dict) -> tuple[list[dict], list[dict], dict]:
    """The rows of a finished study to report beside one of ``identity``, and its identity: of another network,
    trained with every other option that decides a result the same but the ``RECIPE`` (precision, dropout
    masks, compiled step), read from its members' files (never a stale csv).

    Raises:
        ValueError: naming the folder and what is wrong with it.
    """
    try:
        study = Study.open(folder)
    except ValueError as err:
        raise ValueError(f"Expected each `compare` folder to be a finished study, but {err}") from None
    network = study.identity.get("model.net", {}).get("class_path")
    if network == identity.get("model.net", {}).get("class_path"):
        raise ValueError(
            f"Expected `compare` to name studies of other networks, but {folder} is a study of {network} too"
        )
    keys = {k for k in set(study.identity) | set(identity) if k != "model.net" and k not in RECIPE}
    differ = differences(study.identity, identity, keys, "here")
    if differ:
        raise ValueError(
            f"Expected the study in {folder} (`compare`) to differ from this one in its network (`model.net`) "
            f"and its recipe ({', '.join(f'`{k}`' for k in RECIPE)}) alone, but {'; '.join(differ)}"
        )
    try:
        return *study.rows(), study.identity
    except StudyIncomplete as err:
        raise ValueError(f"Expected the study in {folder} (`compare`) to be finished, but {err}") from None
