"""``python -m noise_robustness sweep``: the whole study as one model, in a folder whose identity is its config.

The folder ``--out`` holds ``study.yaml`` (every option that decides a result), ``config.yaml`` (the
full resolved config of the last command), one result file per finished member under ``members/``,
the checkpoint of the training in progress under ``checkpoints/``, TensorBoard runs under
``tensorboard/`` and the tables and figures. Rerunning the same command resumes it; a command with
other options stops before training and names them. Members are trained side by side in one fit;
a cluster job array trains one seed per task (``--task``) and ``--gather true`` reports;
``--compare`` reports finished studies of other networks beside this one.
"""

import csv
import fcntl
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.utilities.exceptions import SIGTERMException

from noise_robustness.cli import flatten
from noise_robustness.run_logger import check_writable
from noise_robustness.study import Member, scales_of, seeds_of, study_members

RESULT_COLUMNS = ["network", "noise_scale", "seed", "noise_mode", "clip", "epochs", "train_acc", "val_acc", "train_loss", "val_loss", "study_id"]
ROBUSTNESS_COLUMNS = ["network", "seed", "train_noise_scale", "eval_noise_scale", "acc"]
# Keys that name where or how a study runs, not what it computes; they may differ between commands.
NOT_IDENTITY = {
    "config", "out", "task", "gather", "compare", "ckpt_path", "scales", "seeds", "data.scales", "data.seeds", "model.scales", "model.seeds",
    "data.data_dir", "data.download", "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes",  # a study's tasks may run on GPUs, its gather on a CPU
}  # fmt: skip


UNSET = "<unset>"  # how a key that one of two configs lacks is shown


class StudyIncomplete(ValueError):
    """A gather found members without results."""


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (a crash leaves the old file or the new one), readable as the umask allows."""
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


def differences(recorded: dict, identity: dict, keys: set[str], now: str) -> list[str]:
    """``"key: <recorded> there, <identity> <now>"`` for each of ``keys`` whose values differ, sorted by key."""
    return [f"{k}: {recorded.get(k, UNSET)!r} there, {identity.get(k, UNSET)!r} {now}" for k in sorted(keys) if recorded.get(k, UNSET) != identity.get(k, UNSET)]


def result_file(out: Path, member: Member) -> Path:
    return out / "members" / f"sigma={member.noise_scale:g}" / f"seed={member.seed}.json"


class Study:
    """A study's folder and plan: which members it has, which are finished, which this command trains.

    Args:
        out: the folder.
        identity: every option that decides a result (``study.yaml``).
        resolved: the command's full resolved config (``config.yaml``).
        members: every member of the study.
        task: train only the members of ``seeds[task]``; None: every member.
        gather: train nothing, only gather and report.
        compare: finished studies of other networks, reported beside this one.
    """

    def __init__(self, out: Path, identity: dict, resolved: dict, members: list[Member], task: int | None, gather: bool, compare: list[Path]):
        self.out, self.identity, self.resolved, self.members = out, identity, resolved, members
        self.task, self.gather_only, self.compare = task, gather, compare
        self.study_id = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()
        task_seed = None if task is None else seeds_of(members)[task]
        mine = [m for m in members if task_seed is None or m.seed == task_seed]
        self.to_train = [] if gather else [m for m in mine if not result_file(out, m).is_file()]
        self._locks: list = []

    @classmethod
    def plan(cls, parser, config) -> "Study":
        """Checks the command against its folder, creating nothing.

        Raises:
            ValueError: bad study options, or a folder that holds another study or no study.
        """
        options = config.sweep
        resolved = yaml.safe_load(parser.dump(config, skip_link_targets=False, skip_none=False))["sweep"]
        identity = {k: v for k, v in flatten(resolved).items() if k not in NOT_IDENTITY}
        members = study_members(options.scales, options.seeds)
        if options.task is not None and not 0 <= options.task < len(options.seeds):
            raise ValueError(f"Expected `task` to be in [0, {len(options.seeds)}), one task per seed of {options.seeds}, but got {options.task}")
        if str(options.trainer.devices) not in ("auto", "1") or options.trainer.num_nodes != 1:
            raise ValueError(
                f"Expected `trainer.devices` and `trainer.num_nodes` to be 1 in a study, which trains its members side by side "
                f"in one process, but got {options.trainer.devices} and {options.trainer.num_nodes}; spread a study over devices "
                "as tasks, one seed each (--task, scripts/slurm_study.sh)"
            )
        out = Path(options.out)
        if out.exists():
            if not out.is_dir():
                raise ValueError(f"Expected `out` to be a study folder, but {out} is a file")
            if not (out / "study.yaml").is_file() and any(out.iterdir()):
                raise ValueError(f"Expected `out` to be a new folder or a study folder, but {out} holds other files and no study.yaml; choose another --out")
            if (out / "study.yaml").is_file():
                recorded = yaml.safe_load((out / "study.yaml").read_text())
                differ = differences(recorded, identity, set(recorded) | set(identity), "now")
                if differ:
                    raise ValueError(
                        f"{out} holds a study made with other options ({'; '.join(differ)}). Its results cannot mix with this "
                        "command's: use a new --out, or rerun with the options it was made with to resume or extend it"
                    )
        compare = [Path(folder) for folder in options.compare or []]
        for folder in compare:
            check_compared(folder, identity)
        check_writable(out, "out")
        study = cls(out, identity, resolved, members, options.task, options.gather, compare)
        if options.gather:
            study.missing()  # nothing to train: a gather needs no GPU time to say what is missing
        return study

    def configure(self, config) -> None:
        """Sets the model and data to the members this command trains, one process, and TensorBoard into the folder."""
        train = self.to_train or self.members  # nothing to train: the classes are built, never fitted
        for target in (config.data, config.model):
            target.scales, target.seeds = scales_of(train), seeds_of(train)  # a product of σ and seeds covering them
        config.trainer.devices = 1  # "auto" would start DDP on a node with several GPUs
        config.trainer.logger = {
            "class_path": "noise_robustness.run_logger.RunLogger",
            "init_args": {"save_dir": str(self.out), "name": "tensorboard", "version": "", "default_hp_metric": False},
        }

    @property
    def checkpoint_dir(self) -> Path:
        """One folder per group of members trained together: a rerun resumes the group it interrupted."""
        names = ",".join(m.name for m in self.to_train)
        return self.out / "checkpoints" / hashlib.blake2b(names.encode(), digest_size=6).hexdigest()

    def start(self) -> None:
        """Creates the folder, records the study, and locks the members this command trains.

        Raises:
            ValueError: another command is training one of them.
        """
        (self.out / "locks").mkdir(parents=True, exist_ok=True)
        if not (self.out / "study.yaml").is_file():
            write_atomic(self.out / "study.yaml", yaml.safe_dump(self.identity, sort_keys=True))
        write_atomic(self.out / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        for member in self.to_train:
            lock = open(self.out / "locks" / f"{member.name.replace('/', ',')}.lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"Another command is training member {member.name} of {self.out}; let it finish (rerun this one afterwards to resume)") from None
            self._locks.append(lock)  # held until this process ends

    def write_results(self, network: str, epochs: int, model, datamodule, accuracy: dict[float, object]) -> None:
        """Writes each trained member's final metrics and its accuracy at every σ of the study (``accuracy``: σ -> [K])."""
        data = datamodule.hparams
        for k, member in enumerate(model.members):
            if member not in self.to_train:
                continue  # trained alongside to make a product of σ and seeds; its result exists
            result = {
                "network": network, "noise_scale": member.noise_scale, "seed": member.seed, "noise_mode": data.noise_mode,
                "clip": data.clip, "epochs": epochs, "study_id": self.study_id,
                **{f"{stage}_{name}": float(model.epoch_metrics[f"{stage}/{name}"][k]) for stage in ("train", "val") for name in ("acc", "loss")},
            }  # fmt: skip
            robustness = [
                {"network": network, "seed": member.seed, "train_noise_scale": member.noise_scale, "eval_noise_scale": scale, "acc": float(acc[k])}
                for scale, acc in accuracy.items()
            ]
            path = result_file(self.out, member)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"result": result, "robustness": robustness}, indent=1))

    def missing(self) -> list[Member]:
        """The study's members without results. Raises StudyIncomplete naming them, if any."""
        missing = [m for m in self.members if not result_file(self.out, m).is_file()]
        if missing:
            names = ", ".join(m.name for m in missing)
            raise StudyIncomplete(f"{len(missing)} of {len(self.members)} members of {self.out} have no results: {names}. Train them (rerun the sweep, or its failed tasks), then gather again")
        return missing

    def gather(self) -> tuple[list[dict], list[dict]]:
        """Writes ``results.csv`` and ``robustness.csv`` from the members' files; returns their rows."""
        self.missing()
        runs = [json.loads(result_file(self.out, m).read_text()) for m in self.members]
        results = [run["result"] for run in runs]
        scales = set(scales_of(self.members))  # a member trained in a larger study holds cells at σ values this one leaves out
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
        raise ValueError(f"Expected each `compare` folder to be a study folder (with study.yaml), but {folder} is not one")
    if not (folder / "results.csv").is_file() or not (folder / "robustness.csv").is_file():
        raise ValueError(f"Expected the study in {folder} (`compare`) to be finished, but it has no results.csv and robustness.csv; finish or gather it first")
    recorded = yaml.safe_load((folder / "study.yaml").read_text())
    network = recorded.get("model.net", {}).get("class_path")
    if network == identity.get("model.net", {}).get("class_path"):
        raise ValueError(f"Expected `compare` to name studies of other networks, but {folder} is a study of {network} too")
    differ = differences(recorded, identity, {k for k in set(recorded) | set(identity) if k.startswith("data.")}, "here")
    if differ:
        raise ValueError(f"Expected the study in {folder} (`compare`) to train on the same noisy data as this one, but {'; '.join(differ)}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def robustness(model, datamodule, scales: list[float]) -> dict[float, object]:
    """Each member's validation accuracy with the noise of every σ in ``scales`` (its own seed's pattern)."""
    model.to(datamodule.device)  # the end of a fit moves the model to the CPU; the images stay on the trainer's device
    return {scale: model.accuracy(datamodule.loader("val", [Member(scale, m.seed) for m in model.members])) for scale in scales}


def say(text: str) -> None:
    print(f"[sweep] {text}", file=sys.stderr, flush=True)


def run_study(trainer: pl.Trainer, model, datamodule, study: Study) -> None:
    """Trains the members ``study`` has not finished, in one fit (resuming an interrupted one), and reports."""
    if study.gather_only:
        return report(study, datamodule)
    done = sum(result_file(study.out, m).is_file() for m in study.members)
    if study.to_train:
        try:
            study.start()
        except ValueError as err:  # a member is locked by another command
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        say(f"{study.out}: training {len(study.to_train)} member(s) side by side ({done} of {len(study.members)} finished earlier)")
        checkpoint = study.checkpoint_dir / "last.ckpt"
        trainer.checkpoint_callback.dirpath = str(study.checkpoint_dir)
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint.is_file() else None)
        except SIGTERMException:  # a cluster's time limit or pre-emption: say so, and fail visibly
            say(f"stopped: rerun the same command to resume {study.out} from its last finished epoch")
            sys.exit(128 + signal.SIGTERM)
        network = type(model.net.member(0)).__name__
        accuracy = robustness(model, datamodule, sorted(scales_of(study.members)))
        study.write_results(network, trainer.max_epochs, model, datamodule, accuracy)
    else:
        say(f"{study.out}: every member of this command finished earlier")
    if study.task is None:
        report(study, datamodule)
    else:
        say(f"task {study.task} done; gather the study with the same command and --gather true")


def report(study: Study, datamodule) -> None:
    """Gathers the members' results into the tables and figures (and TensorBoard), beside the compared studies'."""
    from noise_robustness.report import write_report

    try:
        results, robustness_rows = study.gather()  # this study's own rows: its csv files
    except StudyIncomplete as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for folder in study.compare:  # their rows join the summary and the figures only
        results = results + read_csv(folder / "results.csv")
        robustness_rows = robustness_rows + read_csv(folder / "robustness.csv")
    datamodule.setup("validate")
    write_report(study.out, results, robustness_rows, datamodule, scales_of(study.members))
    say(f"done: {study.out}/results.csv, summary.md, accuracy_vs_noise.png, noise_preview.png, robustness.png")
