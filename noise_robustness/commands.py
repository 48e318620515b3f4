"""The study's subcommands as LightningCLI reads them, and the Trainer's defaults: the Trainer, with ``sweep``,
``certify`` and ``attack`` methods whose typed arguments are the subcommands' options and whose docstrings are their
help.

LightningCLI builds a subcommand's parser from the signature of the Trainer's method of that name, and runs the
CLI's method of that name when the CLI has one (``NoiseCLI.sweep``, ``NoiseCLI.certify``, ``NoiseCLI.attack``): these
methods are the schema, never run (``tests/test_cli.py`` fails if Lightning stops doing either).
"""

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import SaveConfigCallback

from noise_robustness.attacks import attack
from noise_robustness.certify import certification
from noise_robustness.corruptions import Corruption
from noise_robustness.engine.precision import resolve as resolve_precision
from noise_robustness.engine.precision import uses_cuda
from noise_robustness.training.callbacks import EpochLines, NoisySamples, StudyHParams
from noise_robustness.training.member_runs import logger_class, naming_argument, taken_runs

STUDY_SCALES = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0]  # the sweep's default noise levels
STUDY_SEEDS = [0, 1, 2]  # the sweep's default seeds
GRAPHED_STEPS_PER_BATCH = 16  # training batches a graphed step is served at once: Lightning's loop once a block
STUDY_LOGGER = "noise_robustness.training.run_logger.RunLogger"  # a TensorBoard run per member
DEFAULT_RUN_NAME = "lightning_logs"  # TensorBoardLogger's own default name: replaced by the config's
MEMBER_RUNS = "noise_robustness.training.member_runs.MemberRuns"  # a user's logger, a run per member
RUNS = "tb_logs"  # where a run's TensorBoard experiment goes (a study's go to its own folder)


def trainer_defaults() -> dict:
    """Trainer settings of the study: 20 epochs, TensorBoard under ``tb_logs/``, a last checkpoint."""
    interactive = sys.stderr.isatty()
    return {
        "max_epochs": 20,
        "num_sanity_val_steps": 0,  # the study validates after every epoch anyway
        "log_every_n_steps": 1,  # nothing is logged per step; this only silences a warning about short epochs
        "enable_progress_bar": interactive,  # a log file gets one line per epoch instead
        "logger": {
            "class_path": STUDY_LOGGER,
            "init_args": {"save_dir": RUNS, "default_hp_metric": False},
        },
        "callbacks": [newest_checkpoint(), NoisySamples(), StudyHParams(), EpochLines()],  # a line an epoch, time left
    }


def newest_checkpoint(dirpath: Path | None = None) -> ModelCheckpoint:
    """The newest epoch's state and ``last.ckpt`` linking to it (no "best": each member has its own best)."""
    return ModelCheckpoint(dirpath=dirpath, save_top_k=1, save_last="link")


def processes(trainer: Namespace) -> int:
    """How many processes a trainer with these options trains in (``devices`` × ``num_nodes``, a launcher's
    ``WORLD_SIZE``; ``auto`` devices on CUDA: every GPU)."""
    devices = trainer.devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if devices in ("auto", "-1", -1):
        devices = torch.cuda.device_count() if uses_cuda(trainer.accelerator) else 1
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return max(count * int(trainer.num_nodes or 1), int(os.environ.get("WORLD_SIZE", 1)))


# Lightning's own type of `trainer.precision` (Optional[...]), which StudyTrainer widens by `auto`
PRECISION = inspect.signature(pl.Trainer).parameters["precision"].annotation


class StudyTrainer(pl.Trainer):
    """The Trainer, with the options of the ``sweep`` and ``certify`` subcommands, and ``precision`` ``auto``."""

    def __init__(self, *, precision: PRECISION | Literal["auto"] = "auto", **kwargs):
        """``precision`` ``auto``: this machine's fast precision (``engine.precision.fast_precision``); the command
        records which one it chose. The rest is Lightning's."""
        super().__init__(precision=resolve_precision(precision, kwargs.get("accelerator", "auto")), **kwargs)

    def sweep(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        out: str = "sweeps/noise_sweep",
        task: int | None = None,
        gather: bool = False,
        compare: list[str] | None = None,
        eval_corruptions: list[Corruption] | None = None,
        reliability_member: str | None = None,
    ) -> None:
        """Trains the whole study (every σ and seed) as one model, then writes its tables and figures.

        Args:
            out: the study's folder. Rerunning the same command resumes it; a command with other
                options stops, naming them. ``--epochs N`` sets ``trainer.max_epochs``.
            task: train only the members of the seed at this index of ``seeds`` (a cluster job
                array's ``$SLURM_ARRAY_TASK_ID``) and write no report; ``--gather true`` reports.
            gather: train nothing: gather every member's results into the tables and figures; exits
                non-zero, naming the members without results, if any are missing.
            compare: finished study folders of other networks trained on the same noisy data (e.g.
                ``docs/results/cnn``): their results join this study's summary and figures, side by
                side; its csv files keep its own members.
            eval_corruptions: what every member is evaluated on after training, each at its severities (null:
                what the members trained on); clean images always come first (docs/corruptions.md).
            reliability_member: the member whose reliability diagram ``calibration.png`` shows, by name
                (``sigma=0.5/seed=0``); null: the study's first member.
        """
        raise NotImplementedError("a study runs through NoiseCLI.sweep, which checks it against its folder first")

    def certify(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        out: list[str] | str,
        sigma: float | None = None,
        n0: int = 100,
        n: int = 1000,
        alpha: float = 0.001,
        images: int = 200,
    ) -> None:
        """Certifies every member of finished studies by randomized smoothing (Cohen et al. 2019): the certified
        L2 radius of each validation image, and certified accuracy against radius (docs/certify.md).

        Args:
            out: a finished study's folder, or a list of them (one per network, reported side by side);
                the certification goes to ``<out>/certify/<setting>/``, and the same command resumes it.
            sigma: the smoothing noise σ; null: each member's training σ (members trained clean are skipped).
            n0: noise samples that select the class to certify (CERTIFY's n0).
            n: noise samples that estimate its probability (CERTIFY's n).
            alpha: the failure probability of each certificate (and PREDICT's test level).
            images: validation images to certify, the first of one fixed seeded order.
        """
        raise NotImplementedError("a certification runs through NoiseCLI.certify, which checks its studies first")

    def attack(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        out: list[str] | str,
        linf: list[float] = [0.05, 0.1, 0.2, 0.3],
        l2: list[float] = [0.5, 1.0, 1.5, 2.0],
        steps: int = 40,
        linf_step: float = 0.01,
        l2_step: float | None = None,
        random_start: bool = False,
        losses: list[str] = ["ce", "margin"],
        images: int = 1000,
        smoothadv_steps: int = 10,
        smoothadv_samples: int = 8,
    ) -> None:
        """Attacks every member of finished studies with PGD (Madry et al. 2018) under L∞ and L2, all members at once,
        and the smoothed members of their certifications with SmoothAdv (Salman et al. 2019) (docs/attacks.md).

        Args:
            out: a finished study's folder, or a list of them; the attack goes to ``<out>/attack/<setting>/``, and
                the same command resumes it (more ε add rows to it).
            linf: the L∞ radii ε, in units of the [0, 1] pixel range (Madry et al.'s MNIST: up to 0.3).
            l2: the L2 radii ε.
            steps: PGD's steps (Madry et al.'s MNIST: 40).
            linf_step: the L∞ step size (Madry et al.'s MNIST: 0.01).
            l2_step: the L2 step size; null: 2.5 ε / steps (the rule of Madry et al.'s robustness library).
            random_start: start from a random point of the ε-ball instead of the clean image.
            losses: what PGD climbs, one attack each: ``ce`` (cross-entropy: Madry et al.'s, torchattacks'),
                ``margin`` (Carlini & Wagner's: does not saturate); an image counts as robust if none flips it.
            images: validation images to attack, the first of certify's seeded order.
            smoothadv_steps: SmoothAdv's PGD steps against a certified member's smoothed classifier.
            smoothadv_samples: SmoothAdv's noise samples per step (Salman et al.'s m).
        """
        raise NotImplementedError("an attack runs through NoiseCLI.attack, which checks its studies first")


# The evaluations of finished studies: subcommand -> (its module, with plan and run; its setting's class)
EVALUATIONS = {"certify": (certification, certification.Setting), "attack": (attack, attack.Setting)}
EVALUATION_ARGUMENTS = {
    name: set(inspect.signature(getattr(StudyTrainer, name)).parameters) - {"self", "model", "datamodule"}
    for name in EVALUATIONS
}


def plan_evaluation(subcommand: str, config: Namespace) -> list:
    """Checks an evaluation command (``certify``, ``attack``) and its studies (its module's ``plan``); creates nothing.

    Raises:
        ValueError: naming the option or folder and what is wrong.
    """
    module, setting_class = EVALUATIONS[subcommand]
    values = {f.name: config[f.name] for f in dataclasses.fields(setting_class)}
    setting = setting_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return module.plan([config.out] if isinstance(config.out, str) else config.out, setting)


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in a run's folder; a study writes its own into its folder instead."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if "out" not in self.config:  # only a sweep has `out`
            super().setup(trainer, pl_module, stage)


def study_loggers(logger) -> list[dict]:
    """The loggers a sweep serves besides its own TensorBoard runs in ``<out>/tensorboard``: each ``trainer.logger``
    given (one or a list) as a ``MemberRuns`` of it, a run per member (``training/member_runs.py``).

    Raises:
        ValueError: naming a logger the study cannot serve (``false``, which would drop the study's own runs; a class
            that is not a Logger, or whose runs cannot be named), before anything is created.
    """
    if logger is False:
        raise ValueError(
            "Expected `trainer.logger` in a sweep to be a logger (or a list of them), but got False: a study always "
            "writes each member's TensorBoard run into <out>/tensorboard; leave it unset to write only those"
        )
    given = logger if isinstance(logger, list) else [logger] if logger not in (None, True) else []
    served = []
    for spec in given:
        spec = spec.as_dict() if isinstance(spec, Namespace) else dict(spec)
        args = spec.get("init_args") or {}
        if spec["class_path"] == STUDY_LOGGER and (args.get("save_dir"), args.get("name")) == (RUNS, DEFAULT_RUN_NAME):
            continue  # the default of `fit`: a sweep's own runs replace it
        naming_argument(logger_class(spec["class_path"]))
        served.append({"class_path": MEMBER_RUNS, "init_args": {"logger": spec}})
    return served


def check_new_runs(served: list[dict], names: list[str]) -> None:
    """Raises ValueError naming a member's run that a served folder logger already holds (another study's, or a
    run of this one made before its checkpoint was deleted): a new fit's runs never add to them."""
    for spec in served:
        if taken := taken_runs(spec["init_args"]["logger"], names):
            raise ValueError(
                f"Expected `trainer.logger` to write new runs, but {taken[0]} already holds one (of another study, or "
                "of this one before its checkpoint was deleted): give the logger another `save_dir` or `name`"
            )
