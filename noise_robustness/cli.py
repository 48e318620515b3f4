"""The command line: LightningCLI over ``NoiseClassifier`` and ``NoisyMNISTDataModule``, with the study's subcommands.

``fit --config configs/scale_1.0.yaml`` trains one member; ``sweep`` trains the whole study (every σ and seed) as one
model and writes its tables and figures (``training.runner``); ``certify`` and ``attack`` evaluate finished studies
(``commands.EVALUATIONS``); ``validate``, ``test``, ``predict`` and ``--print_config`` are LightningCLI's own. This
module parses and calls; the process exits here only (``cli_main``).
"""

import os
import signal
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace, dict_to_namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from noise_robustness import commands, options
from noise_robustness.commands import EVALUATIONS, StudyTrainer
from noise_robustness.corruptions import BUILT_IN, Corruption
from noise_robustness.data.batches import check_even_shares
from noise_robustness.data.datamodule import NoisyMNISTDataModule, training_images
from noise_robustness.data.mnist import DataFileError
from noise_robustness.engine import switches
from noise_robustness.engine.precision import AUTO, auto_line
from noise_robustness.stops import StopSignals, how_to_resume
from noise_robustness.study.folder import StudyError
from noise_robustness.study.members import members_of, run_names, scales_of, seeds_of
from noise_robustness.study.spec import MEMBER_OPTIONS, RESUMABLE, identity_of
from noise_robustness.study.text import say
from noise_robustness.training import checkpoints, runner
from noise_robustness.training.callbacks import CheckpointRecord
from noise_robustness.training.classifier import NoiseClassifier
from noise_robustness.training.run_logger import last_checkpoint


class NoiseCLI(LightningCLI):
    """LightningCLI whose options name the study's members, with ``sweep``, ``certify`` and ``attack``. Bad values
    found here or in the constructors end as one parser error (exit 2), before any data is read or a folder made."""

    def __init__(self, *classes, args: list[str] | None = None, **kwargs):
        self.tokens = list(sys.argv[1:] if args is None else args)
        super().__init__(*classes, args=args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in ("sweep", *EVALUATIONS)}}
        # the parser of the subcommand asked for alone: building all seven was most of a command's start (0.2 s)
        return {self.tokens[0]: every[self.tokens[0]]} if self.tokens[:1] and self.tokens[0] in every else every

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands and "sweep" in self.subcommands():  # the sweep is the whole study; a fit is one member
            self.parser.set_defaults({"sweep.scales": commands.STUDY_SCALES, "sweep.seeds": commands.STUDY_SEEDS})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--scales", type=list[float], default=[0.0], help="The noise levels σ, in [0, 1] units.")
        parser.add_argument("--seeds", type=list[int], default=[0], help="The study's seeds: one member per (σ, seed).")
        parser.add_argument(
            "--corruptions",
            type=list[Corruption] | None,
            default=None,
            help="What the members train on, each at its `severities` (null: the `--scales`); null: Gaussian noise. "
            f"One of {', '.join(cls.__name__ for cls in BUILT_IN.values())} by class_path (docs/corruptions.md).",
        )
        parser.link_arguments(
            "model.graphed", "data.steps_per_batch", compute_fn=lambda g: commands.GRAPHED_STEPS_PER_BATCH if g else 1
        )
        parser.add_argument(
            "--members", type=list[str] | None, default=None, help="The members to train by name (null: all of them)."
        )
        for target in ("data", "model"):
            for key in MEMBER_OPTIONS:
                parser.link_arguments(key, f"{target}.{key}")

    def parse_arguments(self, parser, args) -> None:
        tokens = self.tokens
        try:
            configs = options.config_files(tokens)
            options.check_given(tokens, configs, commands.EVALUATION_ARGUMENTS)
            options.check_corruptions(tokens, configs)
        except (ValueError, yaml.YAMLError) as err:
            parser.error(str(err))
        if tokens[:1] in (["fit"], ["sweep"]) and any(t.startswith("--print_config") for t in tokens):
            print(f"# {auto_line()}", flush=True)  # a YAML comment
        self.config = parser.parse_args(options.with_epochs_alias(tokens) if tokens[:1] == ["sweep"] else tokens)
        ckpt_path = self.config.get(f"{self.config.get('subcommand')}.ckpt_path")
        if ckpt_path not in (None, "last"):  # before LightningCLI reads it, which fails with a traceback
            try:
                checkpoints.check_checkpoint(ckpt_path)
            except ValueError as err:
                parser.error(str(err))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        try:
            epochs = config.trainer.max_epochs
            if self.subcommand in ("fit", "sweep") and (epochs is None or epochs <= 0):
                raise ValueError(f"Expected `trainer.max_epochs` to be a positive integer, but got {epochs}")
            switches.check_processes(config.model.graphed, commands.processes(config.trainer))
            if self.subcommand == "sweep":
                self.plan = self.plan_study(config)
            elif self.subcommand in EVALUATIONS:
                self.evaluations = commands.plan_evaluation(self.subcommand, config)
            else:
                self.name_run(config)
            # after the plan, which runs a study on one device unless asked (devices auto: 1)
            if self.subcommand in ("fit", "sweep") and commands.processes(config.trainer) > 1:
                data = config.data
                images = training_images(data.dataset, data.data_dir, data.download, data.val_holdout)
                check_even_shares(images, data.batch_size, commands.processes(config.trainer))
        except ValueError as err:
            self.parser.error(str(err))
        trains = self.subcommand == "fit" or (self.subcommand == "sweep" and self.plan.to_train)
        if config.trainer.precision == AUTO and trains and rank_zero_only.rank == 0:  # each member records its own
            say(self.subcommand, auto_line(config.trainer.accelerator))

    def resolved(self) -> dict:
        """The command's full resolved config, nested as YAML writes it."""
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        return resolved[self.subcommand] if self.subcommand else resolved

    def name_run(self, config: Namespace) -> None:
        """Names a run's TensorBoard experiment after its (last) config file, resolves ``--ckpt_path last``, and
        checks a checkpoint it resumes (``fit``: written with these options; else whole)."""
        logger = config.trainer.logger
        if isinstance(logger, Namespace) and "name" in logger.init_args:
            files = [os.fspath(path) for path in config.get("config") or [] if path is not None]
            if logger.init_args.name == commands.DEFAULT_RUN_NAME:
                one = f"scale_{config.scales[0]}" if len(config.scales) == 1 else "study"
                logger.init_args.name = Path(files[-1]).stem if files else one
            if config.get("ckpt_path") == "last":
                config.ckpt_path = last_checkpoint(logger.init_args.save_dir, logger.init_args.name)
        if self.subcommand != "fit" and not config.get("ckpt_path"):
            return  # nothing to record or check: no need to resolve the config
        resolved = self.resolved()
        names = [m.name for m in members_of(resolved)]
        members = {key: resolved[key] for key in MEMBER_OPTIONS if resolved.get(key) is not None}
        members |= {"members": names} if "members" in members else {}  # in the study's order, however typed
        identity = identity_of(resolved) | members  # a run's checkpoint is of its members (Gaussian: no corruptions)
        fit = self.subcommand == "fit"
        if fit:
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], CheckpointRecord(identity)]
        if config.get("ckpt_path"):
            remedy = "resume from a checkpoint of this run's options, or start a new run without --ckpt_path"
            verify = remedy if fit else "name another checkpoint"
            checkpoints.verify(Path(config.ckpt_path), identity if fit else None, RESUMABLE, verify, names)

    def plan_study(self, config: Namespace) -> runner.Plan:
        """Checks a sweep against its folder (``runner.plan``), then sets the classes to the members it trains, the
        study's logger and its checkpoints; creates nothing."""
        served = commands.study_loggers(config.trainer.logger)
        plan = runner.plan(Path(config.out), self.resolved(), config.task, config.gather, config.compare or [])
        train = plan.to_train or plan.study.members  # nothing to train: the classes are built, never fitted
        new_fit = plan.to_train and not (plan.checkpoint_dir / "last.ckpt").is_file()
        if new_fit and rank_zero_only.rank == 0:  # DDP's other processes start once the first has begun the runs
            commands.check_new_runs(
                served,
                [name for m, name in zip(plan.study.members, run_names(plan.study.members)) if m in plan.to_train],
            )
        covering = [dict_to_namespace(c) for c in runner.covering_corruptions(train)]
        for target in (config.data, config.model):  # those members, in a product of severities and seeds covering them
            target.scales, target.seeds, target.corruptions = scales_of(train), seeds_of(train), covering
            target.members = [m.name for m in train]
        if config.trainer.devices == "auto":  # one device unless asked: "auto" would start DDP on every GPU
            config.trainer.devices = 1
        runs = {"save_dir": str(plan.study.out), "name": "tensorboard", "version": "", "default_hp_metric": False}
        config.trainer.logger = [{"class_path": commands.STUDY_LOGGER, "init_args": runs}, *served]
        self.trainer_defaults["callbacks"] = [
            commands.newest_checkpoint(plan.checkpoint_dir) if isinstance(c, ModelCheckpoint) else c
            for c in self.trainer_defaults["callbacks"]
        ] + [CheckpointRecord(plan.study.identity)]
        return plan

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # our constructors' argument checks: a user error, not a bug
            self.parser.error(str(err))
        # cuDNN's fastest convolution gradients add with atomics, in a new order on every run; its deterministic
        # algorithms make a rerun under one fingerprint give the same numbers bit for bit (docs/reproducibility.md)
        torch.backends.cudnn.deterministic = True
        if self.subcommand and self.subcommand not in EVALUATIONS:  # they read each study's own data
            # the data files before the Trainer starts (a bad file stops one process cleanly, not rank zero alone
            # inside DDP while the other ranks wait for it), then the network against the data
            try:
                self.datamodule.prepare_data()
                self.model.check_data(self.datamodule.image_shape, self.datamodule.classes, self.datamodule.name)
            except ValueError as err:
                self.parser.error(str(err))

    def sweep(self, model, datamodule, out: str, task=None, gather=False, compare=None, **planned) -> None:
        """Runs the study planned (and checked against its folder) before the classes were built."""
        runner.run_study(self.trainer, model, datamodule, self.plan, task, gather, [Path(f) for f in compare or []])

    def evaluate(self, model, datamodule, **setting) -> None:
        """``certify``, ``attack``: the evaluation planned before the classes were built, on the trainer's device."""
        module, _ = EVALUATIONS[self.subcommand]
        module.run(self.evaluations, datamodule.hparams.data_dir, self.trainer.strategy.root_device)

    certify = attack = evaluate


def cli_main(args: list[str] | None = None, run: bool = True) -> NoiseCLI:
    """Runs the CLI on ``args`` (default: ``sys.argv``); tests call it in-process. The only place the process exits:

    - 2: bad options or data files (before anything is created); 1: a study that cannot go on as asked
      (``StudyError``), or a file that cannot be written (named; nothing finished is lost);
    - 128 + the signal's number: stopped by SIGTERM (a scheduler's time limit) or SIGINT (Ctrl-C), saying how to
      resume.
    """
    subcommand = next(iter(sys.argv[1:] if args is None else args), None)
    with StopSignals() as stopped:
        try:
            cli = NoiseCLI(
                NoiseClassifier,
                NoisyMNISTDataModule,
                trainer_class=StudyTrainer,
                seed_everything_default=False,  # every seed is explicit: `--seeds`
                trainer_defaults=commands.trainer_defaults(),
                save_config_callback=commands.SaveRunConfig,
                save_config_kwargs={"overwrite": True},  # a run's folder is always new (claimed atomically)
                parser_kwargs={"prog": "python -m noise_robustness"},
                args=args,
                run=run,
            )
        except DataFileError as err:
            exit_with(f"error: {err}", 2)
        except StudyError as err:
            exit_with(f"error: {err}", 1)
        except OSError as err:  # a full disk, a folder made read-only: nothing finished is lost
            filename = err.filename2 or err.filename  # os.replace(temporary, file): the file
            where = f"{err.strerror or err}" + (f" ({filename})" if filename else "")
            exit_with(f"error: {where}; free space or fix the permissions, then {how_to_resume(subcommand)}", 1)
        except (KeyboardInterrupt, SystemExit):
            # Lightning ends a run stopped by Ctrl-C with sys.exit(1), and by SIGTERM with a SystemExit of code 0
            if stopped.signum is None:
                raise
        if stopped.signum is None:
            return cli
    # Stopped by a signal, even one that came as the last epoch ended: a scheduler must not see a success.
    name = signal.Signals(stopped.signum).name
    exit_with(f"[{subcommand}] stopped by {name}: {how_to_resume(subcommand)}", 128 + stopped.signum)


def exit_with(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)
