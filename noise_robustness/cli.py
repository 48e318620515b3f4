"""The command line: LightningCLI over ``NoiseClassifier`` and ``NoisyMNISTDataModule``.

``python -m noise_robustness fit --config configs/scale_1.0.yaml`` trains one model;
``validate``, ``test``, ``predict`` and ``--print_config`` are LightningCLI's own.
"""

import os
import sys

from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from noise_robustness.callbacks import HParamsSummary, NoisySamples
from noise_robustness.classifier import NoiseClassifier
from noise_robustness.data import NoisyMNISTDataModule
from noise_robustness.mnist import DataFileError

DEFAULT_RUN_NAME = "lightning_logs"  # TensorBoardLogger's own default name: replaced by the config's


def trainer_defaults() -> dict:
    """Trainer settings of the study: 20 epochs, TensorBoard under ``tb_logs/``, checkpoints."""
    return {
        "max_epochs": 20,
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "tb_logs", "default_hp_metric": False},
        },
        "callbacks": [
            ModelCheckpoint(monitor="val/acc", mode="max", save_last=True, filename="best-{epoch}"),
            NoisySamples(),
            HParamsSummary(),
        ],
    }


def run_name(config: Namespace) -> str:
    """The experiment name of a run: its (last) config file's name, else ``scale_<σ>``."""
    files = [os.fspath(path) for path in config.get("config") or [] if path is not None]
    if files:
        return os.path.splitext(os.path.basename(files[-1]))[0]
    return f"scale_{config.data.noise_scale}"


class NoiseCLI(LightningCLI):
    """LightningCLI that names each TensorBoard run after its config and reports bad values cleanly."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = config.trainer.logger
        if isinstance(logger, Namespace) and logger.init_args.get("name", DEFAULT_RUN_NAME) == DEFAULT_RUN_NAME:
            logger.init_args.name = run_name(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # our constructors' argument checks: a user error, not a bug
            self.parser.error(str(err))


def cli_main(args: list[str] | None = None, run: bool = True) -> NoiseCLI:
    """Runs the CLI on ``args`` (default: ``sys.argv``); tests call it in-process."""
    try:
        return NoiseCLI(
            NoiseClassifier,
            NoisyMNISTDataModule,
            seed_everything_default=0,
            trainer_defaults=trainer_defaults(),
            parser_kwargs={"prog": "python -m noise_robustness"},
            args=args,
            run=run,
        )
    except DataFileError as err:
        sys.exit(f"error: {err}")
