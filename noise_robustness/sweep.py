"""Running a study: one fit for the members not finished yet, the robustness pass, the result files, the report.

``cli.py`` parses the command and checks it against the study's folder before anything is created;
``run_study`` is what ``python -m noise_robustness sweep`` then runs. The folder and its files are
``study.py``'s; the tables and figures are ``report.py``'s.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from noise_robustness.checkpoints import save_weights
from noise_robustness.report import recipe_note, write_report
from noise_robustness.study import RECIPE, Member, Study, compared_rows, differences


def say(text: str) -> None:
    print(f"[sweep] {text}", file=sys.stderr, flush=True)


def run_study(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    study: Study,
    task: int | None,
    gather: bool,
    compare: list[Path],
) -> None:
    """Trains the members of ``study`` this command owns and has not finished, in one fit (resuming an
    interrupted one), writes their results, and reports the study beside the ``compare`` studies.

    ``model`` and ``datamodule`` hold the members to train (a product of σ and seeds covering them);
    ``trainer`` checkpoints into ``study.checkpoint_dir`` of them.
    """
    if not gather:
        train(trainer, model, datamodule, study, study.to_train(task, gather=False))
    if gather or task is None:
        report(study, datamodule, compare)
    else:
        say(f"task {task} done; gather the study with the same command and --gather true")


def train(trainer: pl.Trainer, model, datamodule, study: Study, to_train: list[Member]) -> None:
    """Fits ``model`` (resuming from the group's last checkpoint), then records each member of ``to_train``."""
    if not to_train:
        say(f"{study.out}: every member of this command finished earlier")
        return
    done = sum(study.finished(m) for m in study.members)
    try:
        study.start(to_train)
    except ValueError as err:  # another study's study.yaml, or a member locked by another command
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    again = len(model.members) - len(to_train)  # finished members that complete the product of σ and seeds
    padding = f"; {again} of them trained again beside them, to make a grid of σ and seeds, their results kept"
    say(
        f"{study.out}: training {len(to_train)} member(s) side by side "
        f"({done} of {len(study.members)} finished earlier{padding if again else ''})"
    )
    try:
        fit(trainer, model, datamodule, study.checkpoint_dir(to_train))
        record(trainer, model, datamodule, study, to_train)
    finally:
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
    accuracy = robustness(trainer, model, datamodule, study.cells)
    network = type(model.net.member(0)).__name__
    data = datamodule.hparams
    for k, member in enumerate(model.members):
        if member not in to_train:
            continue  # trained alongside to make a product of σ and seeds; its result exists
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
            **metrics,
        }  # fmt: skip
        cells = [
            {"network": network, "seed": member.seed,
             "train_corruption": member.corruption.name, "train_noise_scale": member.noise_scale,
             "eval_corruption": corruption.name, "eval_noise_scale": severity, "acc": float(acc[k])}
            for (corruption, severity), acc in accuracy.items()
        ]  # fmt: skip
        # the weights first: a member's result file marks it finished, with everything `certify` needs
        save_weights(study.weights_file(member), model.net.member(k).state_dict(), study.study_id)
        study.write_member(member, result, cells)


def robustness(trainer: pl.Trainer, model, datamodule, cells: list[tuple]) -> dict[tuple, torch.Tensor]:
    """Each member's validation accuracy under every (corruption, severity) of ``cells`` (its own seed's patterns).

    One test pass of the trainer per cell over the validation split, every member given that
    corruption: the same ``model_step`` and metrics as validation, with the trainer's device placement.
    """
    accuracy = {}
    for corruption, severity in cells:
        loader = datamodule.loader("val", [Member(severity, m.seed, corruption) for m in model.members])
        trainer.test(model, dataloaders=loader, verbose=False)
        accuracy[corruption, severity] = model.epoch_metrics["test/acc"]
    return accuracy


def report(study: Study, datamodule, compare: list[Path]) -> None:
    """Gathers the members' results into the tables and figures (and TensorBoard), beside the compared studies'."""
    try:
        results, robustness_rows = study.gather()  # this study's own rows: its csv files
        notes = [recipe_note(study.identity)]
        for folder in compare:  # their rows join the summary and the figures only
            their_results, their_robustness, theirs = compared_rows(folder, study.identity)
            results, robustness_rows = results + their_results, robustness_rows + their_robustness
            if differ := differences(theirs, study.identity, set(RECIPE), "here"):
                notes.append(f"The study compared from {folder} was trained otherwise: {'; '.join(differ)}.")
    except ValueError as err:  # members missing, damaged or of another study, here or in a compared folder
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    datamodule.setup("validate")
    recipe = "\n\n".join(note for note in notes if note) or None
    written = write_report(study.out, results, robustness_rows, datamodule, study.members, study.cells, recipe)
    say(f"done: {study.out}/results.csv, {', '.join(written)}")
