"""The command line: LightningCLI over ``NoiseClassifier`` and ``NoisyMNISTDataModule``.

``python -m noise_robustness fit --config configs/scale_1.0.yaml`` trains one model;
``validate``, ``test``, ``predict`` and ``--print_config`` are LightningCLI's own.
"""

import os
import sys
from pathlib import Path

from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from noise_robustness.callbacks import HParamsSummary, NoisySamples
from noise_robustness.classifier import NoiseClassifier
from noise_robustness.data import NoisyMNISTDataModule
from noise_robustness.mnist import DataFileError
from noise_robustness.run_logger import run_folders

DEFAULT_RUN_NAME = "lightning_logs"  # TensorBoardLogger's own default name: replaced by the config's


def trainer_defaults() -> dict:
    """Trainer settings of the study: 20 epochs, TensorBoard under ``tb_logs/``, checkpoints."""
    return {
        "max_epochs": 20,
        "logger": {
            "class_path": "noise_robustness.run_logger.RunLogger",
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


def last_checkpoint(save_dir: str, name: str) -> str:
    """The newest ``<save_dir>/<name>/version_<n>/checkpoints/last.ckpt``: what ``--ckpt_path last`` resumes."""
    found = [folder / "checkpoints" / "last.ckpt" for _, folder in sorted(run_folders(Path(save_dir, name)).items())]
    found = [path for path in found if path.is_file()]
    if not found:
        raise ValueError(f"Expected a checkpoint to resume with `--ckpt_path last`, but found no {Path(save_dir, name, 'version_*/checkpoints/last.ckpt')}")
    return str(found[-1])


def config_files(tokens: list[str]) -> list[str]:
    """The config files named in ``tokens``: ``-c F``, ``--config F`` or ``--config=F``."""
    files = [value for flag, value in zip(tokens, tokens[1:]) if flag in ("-c", "--config")]
    return files + [token.split("=", 1)[1] for token in tokens if token.startswith("--config=")]


class NoiseCLI(LightningCLI):
    """LightningCLI that names each run's TensorBoard folder after its config and resolves ``--ckpt_path last``.

    Bad values found here or in the constructors end as one parser error, before any data is read.
    """

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse answers an empty config file with a bare "Unexpected config:"; name the file.
        for path in config_files(sys.argv[1:] if args is None else args):
            if os.path.isfile(path) and not Path(path).read_text().strip():
                parser.error(f"Expected the config file {path} to hold options, but it is empty")
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        try:
            self.check_and_name_run()
        except ValueError as err:
            self.parser.error(str(err))

    def check_and_name_run(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if self.subcommand == "fit" and (config.trainer.max_epochs is None or config.trainer.max_epochs <= 0):
            raise ValueError(f"Expected `trainer.max_epochs` to be a positive integer, but got {config.trainer.max_epochs}")
        logger = config.trainer.logger
        if not isinstance(logger, Namespace) or "name" not in logger.init_args:
            return
        args = logger.init_args
        if args.name == DEFAULT_RUN_NAME:
            args.name = run_name(config)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = last_checkpoint(args.save_dir, args.name)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # our constructors' argument checks: a user error, not a bug
            self.parser.error(str(err))
        if self.subcommand:
            # Check the data files before the Trainer starts: a bad file then stops one process
            # cleanly, instead of rank zero alone inside DDP while the other ranks wait for it.
            self.datamodule.prepare_data()


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
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
