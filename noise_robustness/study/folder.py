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
neither Lightning nor jsonargparse: ``runner.py`` runs a study in it, ``cli.py`` parses its options.
"""

import hashlib
import json
from pathlib import Path

import yaml

from noise_robustness.corruptions import GAUSSIAN
from noise_robustness.files import (
    Lock,
    check_writable,
    create_exclusive,
    csv_text,
    read_options,
    remove_interrupted_writes,
    write_atomic,
)
from noise_robustness.study.members import Member, evaluations, members_of, seeds_of
from noise_robustness.study.spec import RECIPE, differences, identity_of

RESULT_COLUMNS = [
    "network", "corruption", "noise_scale", "seed", "noise_mode", "clip", "epochs",
    "train_acc", "val_acc", "train_loss", "val_loss", "study_id", "precision",
]  # fmt: skip
# ``ece``: empty for members written before calibration was measured; the members' files keep its bins as well
ROBUSTNESS_COLUMNS = [
    "network", "seed", "train_corruption", "train_noise_scale", "eval_corruption", "eval_noise_scale", "acc", "ece",
]  # fmt: skip

# -- the study -----------------------------------------------------------------------------------


class StudyError(ValueError):
    """A study that cannot go on as asked, found once it runs (members locked by another command, missing or of
    another study): the command ends with this message and exit code 1, nothing finished lost."""


class StudyIncomplete(StudyError):
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

    def as_recorded(self, keys: tuple[str, ...]) -> "Study":
        """This study with the values of ``keys`` its folder's ``study.yaml`` records (itself in a new folder)."""
        if not (self.out / "study.yaml").is_file():
            return self
        recorded = read_options(self.out / "study.yaml")
        identity = self.identity | {key: recorded[key] for key in keys if key in recorded}
        return Study(self.out, identity, self.members, self.resolved, self.cells)

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
            StudyError: another command is training one of them, or another study was recorded there first.
        """
        (self.out / "locks").mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(self.out)  # of a command killed mid-write here
        # Exclusive: of two commands with other options that both found no study.yaml, one records its
        # study and the other is refused here, before it trains.
        if not create_exclusive(self.out / "study.yaml", yaml.safe_dump(self.identity, sort_keys=True)):
            try:
                self.check_identity(read_options(self.out / "study.yaml"))
            except ValueError as err:
                raise StudyError(str(err)) from None
        write_atomic(self.out / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        for member in to_train:
            lock = Lock(self.out / "locks" / f"{member.name.replace('/', ',')}.lock")
            self._locks.append(lock)
            if not lock.held:
                self.release()  # this command trains none of them
                raise StudyError(
                    f"Another command is training member {member.name} of {self.out}; let it finish "
                    "(rerun this one afterwards to resume)"
                )

    def release(self) -> None:
        """Releases the locks ``start`` took (a process that ends releases them too)."""
        for lock in self._locks:
            lock.release()
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
        remove_interrupted_writes(self.out)  # of a command killed mid-write here (a report's figures, say)
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
        return cls.of(out, read_options(out / "config.yaml"), read_options(out / "study.yaml"))

    @classmethod
    def of(cls, out: Path, resolved: dict, identity: dict | None = None) -> "Study":
        """The study a command's resolved config (nested) describes, in ``out``: its members and evaluation cells;
        ``identity`` as recorded (default: the config's own, ``spec.identity_of``)."""
        members = members_of(resolved)
        cells = evaluations(resolved.get("eval_corruptions"), resolved["scales"], members)
        return cls(out, identity_of(resolved) if identity is None else identity, members, resolved, cells)


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
