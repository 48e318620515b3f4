"""A study's folder: its members, its identity, which members are finished, locks, result files and the gather.

A study is one network per (noise level σ, seed), its *members*. Its folder ``out`` holds:

- ``study.yaml``: the study's identity, every option that decides a result; a command with other
  options is refused, naming each key that differs;
- ``config.yaml``: the full resolved config of the last command that trained in it;
- ``members/sigma=<σ>/seed=<s>.json``: one result file per finished member, written atomically;
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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from noise_robustness.noise import check_noise_scale

RESULT_COLUMNS = [
    "network", "noise_scale", "seed", "noise_mode", "clip", "epochs",
    "train_acc", "val_acc", "train_loss", "val_loss", "study_id",
]  # fmt: skip
ROBUSTNESS_COLUMNS = ["network", "seed", "train_noise_scale", "eval_noise_scale", "acc"]
# Keys that name where or how a study runs, not what it computes; they may differ between commands.
NOT_IDENTITY = {
    "config", "out", "task", "gather", "compare", "ckpt_path",
    "scales", "seeds", "data.scales", "data.seeds", "model.scales", "model.seeds",
    "data.data_dir", "data.download",
    "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes",  # tasks may run on GPUs, the gather on a CPU
}  # fmt: skip
UNSET = "<unset>"  # how a key that one of two configs lacks is shown


@dataclass(frozen=True)
class Member:
    """One network of the study. ``seed`` seeds its weights, shuffle order, dropout and noise draw."""

    noise_scale: float
    seed: int

    @property
    def name(self) -> str:
        """``sigma=0.5/seed=0``: how results and messages name it."""
        return f"sigma={self.noise_scale:g}/seed={self.seed}"


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
    decimals = max(len(f"{m.noise_scale:g}".partition(".")[2]) for m in members)
    sigmas = [f"{m.noise_scale:.{decimals}f}" for m in members]
    width = max(len(s) for s in sigmas)
    seed_width = max(len(str(m.seed)) for m in members)
    return [f"sigma={s.zfill(width)}/seed={m.seed:0{seed_width}d}" for s, m in zip(sigmas, members)]


def study_members(scales: list[float], seeds: list[int]) -> list[Member]:
    """Every (σ, seed) of the study, seed-major: members of one seed share a shuffle order and noise pattern.

    Raises:
        ValueError: an empty or repeated list, or a σ that is not a finite number >= 0.
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
    return [Member(scale, seed) for seed in seeds for scale in scales]


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
    return {k: v for k, v in flatten(resolved).items() if k not in NOT_IDENTITY}


def differences(recorded: dict, identity: dict, keys: set[str], now: str) -> list[str]:
    """``"key: <recorded> there, <identity> <now>"`` for each of ``keys`` whose values differ, sorted by key."""
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


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (a crash leaves the old file or the new one), readable as umask allows."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; colleagues in a shared folder should read them
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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

    def __init__(self, out: Path, identity: dict, members: list[Member], resolved: dict | None = None):
        self.out, self.identity, self.members, self.resolved = Path(out), identity, members, resolved or {}
        digest = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=4)
        self.study_id = digest.hexdigest()
        self._locks: list = []  # open lock files, held until this process ends

    def result_file(self, member: Member) -> Path:
        return self.out / "members" / f"sigma={member.noise_scale:g}" / f"seed={member.seed}.json"

    def finished(self, member: Member) -> bool:
        return self.result_file(member).is_file()

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
                recorded = yaml.safe_load((out / "study.yaml").read_text())
                differ = differences(recorded, self.identity, set(recorded) | set(self.identity), "now")
                if differ:
                    raise ValueError(
                        f"{out} holds a study made with other options ({'; '.join(differ)}). Its results cannot mix "
                        "with this command's: use a new --out, or rerun with the options it was made with to resume "
                        "or extend it"
                    )
        check_writable(out, "out")

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
        if not (self.out / "study.yaml").is_file():
            write_atomic(self.out / "study.yaml", yaml.safe_dump(self.identity, sort_keys=True))
        write_atomic(self.out / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        for member in to_train:
            lock = open(self.out / "locks" / f"{member.name.replace('/', ',')}.lock", "a")  # noqa: SIM115 (held until the process ends)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(
                    f"Another command is training member {member.name} of {self.out}; let it finish "
                    "(rerun this one afterwards to resume)"
                ) from None
            self._locks.append(lock)

    def write_member(self, member: Member, result: dict, robustness: list[dict]) -> None:
        """Records ``member`` as finished: its final metrics and its accuracy at every σ, in one atomic file."""
        path = self.result_file(member)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"result": result, "robustness": robustness}, indent=1))

    def missing(self) -> list[Member]:
        """The study's members without results. Raises StudyIncomplete naming them, if any."""
        missing = [m for m in self.members if not self.finished(m)]
        if missing:
            raise StudyIncomplete(
                f"{len(missing)} of {len(self.members)} members of {self.out} have no results: "
                f"{', '.join(m.name for m in missing)}. "
                "Train them (rerun the sweep, or its failed tasks), then gather again"
            )
        return missing

    def gather(self) -> tuple[list[dict], list[dict]]:
        """Writes ``results.csv`` and ``robustness.csv`` from the members' files; returns their rows."""
        self.missing()
        runs = [json.loads(self.result_file(m).read_text()) for m in self.members]
        results = [run["result"] for run in runs]
        scales = set(
            scales_of(self.members)
        )  # a member trained in a larger study holds cells at σ values this one leaves out
        robustness = [row for run in runs for row in run["robustness"] if row["eval_noise_scale"] in scales]
        write_atomic(self.out / "results.csv", csv_text(RESULT_COLUMNS, results))
        write_atomic(self.out / "robustness.csv", csv_text(ROBUSTNESS_COLUMNS, robustness))
        return results, robustness


def check_compared(folder: Path, identity: dict) -> None:
    """A study to report beside one of ``identity``: finished, of another network, on the same noisy data.

    Raises:
        ValueError: naming the folder and what is wrong with it.
    """
    if not (folder / "study.yaml").is_file():
        raise ValueError(
            f"Expected each `compare` folder to be a study folder (with study.yaml), but {folder} is not one"
        )
    if not (folder / "results.csv").is_file() or not (folder / "robustness.csv").is_file():
        raise ValueError(
            f"Expected the study in {folder} (`compare`) to be finished, but it has no results.csv and robustness.csv; "
            "finish or gather it first"
        )
    recorded = yaml.safe_load((folder / "study.yaml").read_text())
    network = recorded.get("model.net", {}).get("class_path")
    if network == identity.get("model.net", {}).get("class_path"):
        raise ValueError(
            f"Expected `compare` to name studies of other networks, but {folder} is a study of {network} too"
        )
    data_keys = {k for k in set(recorded) | set(identity) if k.startswith("data.")}
    differ = differences(recorded, identity, data_keys, "here")
    if differ:
        raise ValueError(
            f"Expected the study in {folder} (`compare`) to train on the same noisy data as this one, "
            f"but {'; '.join(differ)}"
        )
