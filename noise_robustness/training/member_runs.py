"""A user's Lightning logger in a study: one run of it per member, named after the member.

``sweep --trainer.logger CSVLogger --trainer.logger.save_dir csvlogs`` gives every member its own CSVLogger run
(``csvlogs/<name>/sigma=0.5/seed=0/metrics.csv``), with the member's σ (or corruption and severity) and seed as
its hyperparameters and its metrics per epoch; the study's own TensorBoard runs in ``<out>/tensorboard`` are written
beside it. Any ``pytorch_lightning.loggers.Logger`` serves, if a run of it can be named: a folder logger
(TensorBoard, CSV) takes the member's name as its ``version``, others as their ``run_name`` (MLflow) or ``name``
(Neptune). W&B is refused: every WandbLogger of a process logs into one run (``wandb.run``). A logger that takes
images (TensorBoard, a ``log_image`` method) gets each member's sample images, and the study's figures in a run
named ``study``; a CSV logger, numbers only.
"""

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.cli import instantiate_class
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from noise_robustness.classpaths import class_at
from noise_robustness.study.members import Member, hparams_of, run_names

FOLDER_LOGGERS = (CSVLogger, TensorBoardLogger)  # a run is a folder: <save_dir>/<name>/<version>
NAMING = ("run_name", "name")  # how other loggers name a run, in the order tried
ONE_RUN_PER_PROCESS = ("WandbLogger",)  # its runs are wandb.run: a second one in a process logs into the first


def logger_class(class_path: str) -> type:
    """The class at ``class_path`` (``pytorch_lightning.loggers.CSVLogger``), or ValueError naming it."""
    return class_at(class_path, Logger, "trainer.logger", "a logger class")


def naming_argument(cls: type) -> str:
    """The argument of ``cls`` that names one run of it: ``version`` (folder loggers), ``run_name`` or ``name``.

    Raises:
        ValueError: naming the logger, when it takes none of them (a run per member could not be told apart), or
            when it keeps one run per process (W&B: ``wandb.run``, which every WandbLogger of a process reuses).
    """
    if any(base.__name__ in ONE_RUN_PER_PROCESS for base in cls.__mro__):
        raise ValueError(
            f"Expected `trainer.logger` {cls.__module__}.{cls.__qualname__} to hold a run per member, but it logs "
            "every logger of a process into one run (wandb.run): use CSVLogger, TensorBoardLogger or MLFlowLogger"
        )
    if issubclass(cls, FOLDER_LOGGERS):
        return "version"
    parameters = inspect.signature(cls.__init__).parameters
    for argument in NAMING:
        if argument in parameters:
            return argument
    raise ValueError(
        f"Expected `trainer.logger` {cls.__module__}.{cls.__qualname__} to name a run (a `version`, `run_name` or "
        "`name` argument), so that each member gets its own, but it takes none: use another logger"
    )


def taken_runs(logger: dict, names: list[str]) -> list[Path]:
    """The runs among ``names`` that a folder ``logger`` (``{"class_path", "init_args"}``) already holds: a new
    member's run must not add to another study's (a resumed one continues its own)."""
    cls, args = logger_class(logger["class_path"]), logger.get("init_args") or {}
    if not issubclass(cls, FOLDER_LOGGERS):
        return []
    defaults = inspect.signature(cls.__init__).parameters
    root = Path(args.get("save_dir", defaults["save_dir"].default), args.get("name", defaults["name"].default) or "")
    return [root / name for name in names if (root / name).is_dir() and any((root / name).iterdir())]


def takes_images(cls: type) -> bool:
    """Whether runs of the logger class ``cls`` take images: TensorBoard's, or one with a ``log_image`` method."""
    return issubclass(cls, TensorBoardLogger) or callable(getattr(cls, "log_image", None))


def add_image(run: Logger, tag: str, image: torch.Tensor) -> None:
    """``image`` (``[C, H, W]``) into ``run`` under ``tag``, as its logger takes images."""
    if isinstance(run, TensorBoardLogger):
        run.experiment.add_image(tag, image, global_step=0)
    else:
        run.log_image(key=tag, images=[image.permute(1, 2, 0).numpy()], step=0)


class MemberRuns(Logger):
    """One run of the ``logger`` class (``{"class_path": ..., "init_args": {...}}``) per member, made when the member
    first logs; what Lightning logs to every logger (nothing per member) it leaves out.

    Args:
        logger: the user's logger, as the config gives it.
    """

    def __init__(self, logger: dict):
        super().__init__()
        self.spec = {"class_path": logger["class_path"], "init_args": dict(logger.get("init_args") or {})}
        self.naming = naming_argument(logger_class(self.spec["class_path"]))
        self.runs: dict[str, Logger] = {}

    @property
    def name(self) -> str | None:
        return self.spec["init_args"].get("name")

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str | None:
        return self.spec["init_args"].get("save_dir")

    def named_run(self, name: str) -> Logger:
        """A new run of the logger, named ``name``."""
        init = {"class_path": self.spec["class_path"], "init_args": {**self.spec["init_args"], self.naming: name}}
        return instantiate_class((), init)

    def run(self, member: Member, members: list[Member]) -> Logger:
        """``member``'s run of the logger, named after it (``sigma=0.5/seed=0``)."""
        if member.name not in self.runs:
            self.runs[member.name] = self.named_run(run_names(members)[members.index(member)])
        return self.runs[member.name]

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the study's options are in <out>/study.yaml; each member's run gets its own (log_member_hparams)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass  # the module logs means over members to no logger; each member's metrics come through log_members

    @rank_zero_only
    def log_members(self, metrics: dict[str, torch.Tensor], members: list[Member], step: int) -> None:
        """Logs ``metrics`` (tag -> one value per member) into each member's run at ``step`` (the epoch)."""
        for k, member in enumerate(members):
            run = self.run(member, members)
            run.log_metrics({tag: float(values[k]) for tag, values in metrics.items()}, step=step)
            run.save()

    @rank_zero_only
    def log_member_hparams(self, members: list[Member], constants: dict[str, object]) -> None:
        for member, apart in hparams_of(members).items():
            self.run(member, members).log_hyperparams({**apart, **constants})

    @rank_zero_only
    def log_member_image(self, member: Member, members: list[Member], tag: str, image: torch.Tensor) -> None:
        """``image`` ``[C, H, W]`` in ``member``'s run, where its logger takes images."""
        if takes_images(logger_class(self.spec["class_path"])):
            add_image(self.run(member, members), tag, image)

    @rank_zero_only
    def log_study_figures(self, figures: list[Path]) -> None:
        """The study's figures (PNG files) into a run of the logger named ``study``, where it takes images."""
        if not takes_images(logger_class(self.spec["class_path"])):
            return  # CSV: numbers only
        run = self.named_run("study")
        for figure in figures:
            with Image.open(figure) as png:
                add_image(
                    run, f"study/{figure.stem}", torch.from_numpy(np.asarray(png.convert("RGB"))).permute(2, 0, 1)
                )
        run.finalize("success")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        for run in self.runs.values():
            run.finalize(status)
