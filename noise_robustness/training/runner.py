"""Running a study: one fit for the members not finished yet, the robustness pass, the result files, the report.

``plan`` checks a command against the study's folder before anything is built or created; ``run_study`` is what
``python -m noise_robustness sweep`` (or ``noise_robustness.api.sweep``) then runs. The folder and its files are
``study/folder.py``'s; the tables and figures are ``study/report.py``'s.
"""

from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from noise_robustness.calibration import SUMS, expected_calibration_error
from noise_robustness.data import datasets
from noise_robustness.study.folder import Study, StudyError, compared_rows
from noise_robustness.study.members import Member, network_name
from noise_robustness.study.report import write_report
from noise_robustness.study.spec import (
    RECIPE,
    TRAINING,
    differences,
    identity_of,
    machines_note,
    precisions_used,
    recipe_note,
)
from noise_robustness.study.text import say
from noise_robustness.training import checkpoints
from noise_robustness.training.callbacks import CheckpointRecord
from noise_robustness.training.checkpoints import save_weights


@dataclass
class Plan:
    """What a ``sweep`` command does in its folder, decided before anything is built or created."""

    study: Study
    to_train: list[Member]  # this command's members not finished yet
    checkpoint_dir: Path  # where their fit checkpoints, and a rerun resumes it
    reliability: Member  # the member whose reliability diagram the report shows


def plan(out: Path, resolved: dict, task: int | None, gather: bool, compare: list[str]) -> Plan:
    """Checks a sweep (its resolved options, nested) against its folder and the ``compare`` folders; creates nothing.

    Raises:
        ValueError: bad study options, a folder that holds another study or no study, a compared folder that is
            not a finished study of another network, a ``reliability_member`` the study lacks, or a checkpoint to
            resume that is damaged or of another study.
    """
    study = Study.of(out, resolved, study_identity(resolved))
    named, reliability_member = {m.name: m for m in study.members}, resolved.get("reliability_member")
    if reliability_member is not None and reliability_member not in named:
        raise ValueError(f"Expected `reliability_member` to name a member of the study ({', '.join(named)}), but "
                         f"got {reliability_member!r}")  # fmt: skip
    to_train = study.to_train(task, gather)
    if not to_train:  # what decides only how members train may differ: nothing trains (`auto` elsewhere, say)
        study = study.as_recorded(TRAINING)
    study.check()
    for folder in compare:
        compared_rows(Path(folder), study.identity)
    if gather:
        study.finished_runs()  # nothing to train: a gather needs no GPU time to say what is missing
    checkpoint_dir = study.checkpoint_dir(to_train)
    if (checkpoint_dir / "last.ckpt").is_file():  # what a rerun resumes: whole, and of this study
        remedy = f"delete {checkpoint_dir} to train {len(to_train)} member(s) from their first epoch"
        checkpoints.verify(checkpoint_dir / "last.ckpt", study.identity, set(), remedy, [m.name for m in to_train])
    return Plan(study, to_train, checkpoint_dir, named.get(reliability_member, study.members[0]))


def study_identity(resolved: dict) -> dict:
    """The options of a resolved config that decide its results (``spec.identity_of``), and for a dataset other than
    the shipped MNIST (checked by its own SHA-256 sums) a SHA-256 of what was read (``data.sha256``): the same
    options on other files are another study.

    Raises:
        ValueError: the dataset cannot be read as a study's data (``data/datasets.py``).
    """
    data = resolved.get("data") or {}
    if data.get("dataset") is None:
        return identity_of(resolved)
    files = datasets.load(data["dataset"], data["data_dir"], data.get("download", False))
    return identity_of(resolved) | {"data.sha256": datasets.sha256(files)}


def run_study(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    plan: Plan,
    task: int | None,
    gather: bool,
    compare: list[Path],
) -> None:
    """Trains the members of the ``plan``'s study this command owns and has not finished, in one fit (resuming an
    interrupted one), writes their results, and reports the study beside the ``compare`` studies.

    ``model`` and ``datamodule`` hold the members to train;
    ``trainer`` checkpoints into ``study.checkpoint_dir`` of them.
    """
    study = plan.study
    if not gather:
        train(trainer, model, datamodule, study, study.to_train(task, gather=False))
    if not trainer.is_global_zero:  # DDP: the other processes trained and evaluated; the first one writes
        return
    if gather or task is None:
        report(study, datamodule, compare, trainer.loggers, plan.reliability)
    else:
        say("sweep", f"task {task} done; gather the study with the same command and --gather true")


def train(trainer: pl.Trainer, model, datamodule, study: Study, to_train: list[Member]) -> None:
    """Fits ``model`` (resuming from the group's last checkpoint), then records each member of ``to_train``."""
    if not to_train:
        say("sweep", f"{study.out}: every member of this command finished earlier")
        return
    done = sum(study.finished(m) for m in study.members)
    first = trainer.is_global_zero  # with DDP, the process that writes the study's files (the others compute)
    if first:
        study.start(to_train)  # StudyError: another study's study.yaml, or a member locked by another command
        finished = f"{done} of {len(study.members)} finished earlier"
        processes = f" in {trainer.world_size} processes" if trainer.world_size > 1 else ""
        say("sweep", f"{study.out}: training {len(to_train)} member(s) side by side{processes} ({finished})")
    try:
        fit(trainer, model, datamodule, study.checkpoint_dir(to_train))
        record(trainer, model, datamodule, study, to_train)
    finally:
        if first:
            study.release()


def fit(trainer: pl.Trainer, model, datamodule, checkpoint_dir: Path) -> None:
    """``trainer.fit``, resumed from ``checkpoint_dir/last.ckpt`` if there is one (at the last epoch: no step)."""
    checkpoint = checkpoint_dir / "last.ckpt"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint.is_file() else None)
    except OSError as err:  # Lightning writes checkpoints without naming them in its errors
        raise OSError(err.errno, err.strerror, err.filename or str(checkpoint_dir)) from err
    if trainer.received_sigterm:  # came as the last epoch ended: stop here; a rerun reports from the checkpoint
        raise SIGTERMException()


def record(trainer: pl.Trainer, model, datamodule, study: Study, to_train: list[Member]) -> None:
    """Writes each trained member's final weights, metrics and accuracy at every σ of the study, a file each."""
    final = dict(model.epoch_metrics)  # the last epoch's (or its checkpoint's), before the robustness pass
    evaluated = robustness(trainer, model, datamodule, study.cells)  # every process: the test passes are collective
    if not trainer.is_global_zero:
        return
    network = network_name(type(model.net.member(0)))
    data = datamodule.hparams
    trained_on = next(c.trained_on for c in trainer.callbacks if isinstance(c, CheckpointRecord))
    precision = "+".join(dict.fromkeys(where["precision"] for where in trained_on))  # `auto` may have moved
    for k, member in enumerate(model.members):
        if member not in to_train:
            continue  # finished by another command since this one was planned: its result stands
        # float32, as the metrics are logged (and as every results.csv has recorded them)
        metrics = {
            f"{stage}_{name}": float(final[f"{stage}/{name}"][k].float())
            for stage in ("train", "val")
            for name in ("acc", "loss")
        }
        result = {
            "network": network, "corruption": member.corruption.name, "noise_scale": member.noise_scale,
            "seed": member.seed,
            "noise_mode": data.noise_mode, "clip": data.clip, "epochs": trainer.max_epochs, "study_id": study.study_id,
            **metrics, "precision": precision, "trained_on": trained_on,
        }  # fmt: skip
        cells = [
            {"network": network, "seed": member.seed,
             "train_corruption": member.corruption.name, "train_noise_scale": member.noise_scale,
             "eval_corruption": corruption.name, "eval_noise_scale": severity, "acc": float(acc[k]),
             "ece": float(expected_calibration_error(sums[:, k])),
             "calibration": {name: sums[i, k].tolist() for i, name in enumerate(SUMS)}}
            for (corruption, severity), (acc, sums) in evaluated.items()
        ]  # fmt: skip
        # the weights first: a member's result file marks it finished, with everything `certify` needs
        save_weights(study.weights_file(member), model.net.member(k).state_dict(), study.study_id)
        study.write_member(member, result, cells)


def robustness(trainer: pl.Trainer, model, datamodule, cells: list[tuple]) -> dict[tuple, tuple]:
    """Each member's validation accuracy ``[K]`` and calibration sums ``[3, K, bins + 1]``
    (``calibration.calibration_sums``) under every (corruption, severity) of ``cells`` (its own seed's patterns).

    One test pass of the trainer per cell over the validation split, every member given that
    corruption: the same metrics as validation, with the trainer's device placement.
    """
    evaluated = {}
    for corruption, severity in cells:
        loader = datamodule.loader("val", [Member(severity, m.seed, corruption) for m in model.members])
        trainer.test(model, dataloaders=loader, verbose=False)
        evaluated[corruption, severity] = model.epoch_metrics["test/acc"], model.test_calibration.cpu()
    return evaluated


def report(
    study: Study, datamodule, compare: list[Path], loggers: list = (), reliability: Member | None = None
) -> None:
    """Gathers the members' results into the tables and figures (and TensorBoard), beside the compared studies';
    the figures also go to the user's ``loggers`` that take them (``MemberRuns.log_study_figures``)."""
    try:
        results, robustness_rows = study.gather()  # this study's own rows: its csv files
        notes = [recipe_note(study.identity, results), machines_note(results)]
        mine = precisions_used(study.identity, results)
        for folder in compare:  # their rows join the summary and the figures only
            their_results, their_robustness, theirs = compared_rows(folder, study.identity)
            results, robustness_rows = results + their_results, robustness_rows + their_robustness
            # the precision as the members used it (under `auto`, each member's own), the rest as recorded
            differ = differences(theirs, study.identity, set(RECIPE) - {"trainer.precision"}, "here")
            if (theirs_used := precisions_used(theirs, their_results)) != mine:
                differ.append(f"precision: {theirs_used} there, {mine} here")
            if differ:
                notes.append(f"The study compared from {folder} was trained otherwise: {'; '.join(differ)}.")
    except ValueError as err:  # members missing, damaged or of another study, here or in a compared folder
        raise StudyError(str(err)) from None
    datamodule.setup("validate")
    recipe = "\n\n".join(note for note in notes if note) or None
    written = write_report(
        study.out, results, robustness_rows, datamodule, study.members, study.cells, recipe, reliability
    )
    figures = [study.out / name for name in written if name.endswith(".png")]
    for logger in loggers:
        if callable(getattr(logger, "log_study_figures", None)):
            logger.log_study_figures(figures)
    say("sweep", f"done: {study.out}/results.csv, {', '.join(written)}")


def covering_corruptions(members: list[Member]) -> list[dict]:
    """Each corruption of ``members`` at exactly their severities (in their order), as config values: with their
    seeds, a product that covers ``members`` (severity 0, clean, is Gaussian noise's)."""
    by_corruption = {}
    for m in members:
        by_corruption.setdefault(m.corruption, []).append(m.noise_scale)
    return [
        {
            "class_path": f"{type(c).__module__}.{type(c).__qualname__}",
            "init_args": {"severities": list(dict.fromkeys(levels))},
        }
        for c, levels in by_corruption.items()
    ]
