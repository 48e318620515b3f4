"""The command line: LightningCLI over ``NoiseClassifier`` and ``NoisyMNISTDataModule``, with ``sweep``.

``python -m noise_robustness fit --config configs/scale_1.0.yaml`` trains one member;
``python -m noise_robustness sweep`` trains the whole study (every σ and seed) as one model and
writes its tables and figures. ``validate``, ``test``, ``predict`` and ``--print_config`` are
LightningCLI's own. Every subcommand reads the same options; ``--scales`` and ``--seeds`` name the
study's members.
"""

import inspect
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from noise_robustness import certification, checkpoints
from noise_robustness.callbacks import CheckpointRecord, EpochLines, NoisySamples, StudyHParams
from noise_robustness.certification import Setting
from noise_robustness.classifier import NoiseClassifier
from noise_robustness.corruptions import BUILT_IN, Corruption
from noise_robustness.data import NoisyMNISTDataModule
from noise_robustness.mnist import DataFileError
from noise_robustness.precision import resolve as resolve_precision
from noise_robustness.precision import uses_cuda
from noise_robustness.run_logger import run_folders
from noise_robustness.study import (
    Study,
    compared_rows,
    distinct,
    evaluations,
    flatten,
    identity_of,
    scales_of,
    seeds_of,
    study_members,
)
from noise_robustness.sweep import run_study

DEFAULT_RUN_NAME = "lightning_logs"  # TensorBoardLogger's own default name: replaced by the config's
# Lightning's own type of `trainer.precision` (Optional[...]), which StudyTrainer widens by `auto`
PRECISION = inspect.signature(pl.Trainer).parameters["precision"].annotation
STUDY_SCALES = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0]  # the sweep's default noise levels
STUDY_SEEDS = [0, 1, 2]  # the sweep's default seeds

# Options a `fit --ckpt_path` may change from the run it resumes: train for more epochs, observe differently.
RESUMABLE_CHANGES = {"trainer.max_epochs", "trainer.callbacks"}
# How a command stopped by a signal is resumed, by subcommand.
RESUME = {
    "sweep": "rerun the same command to resume the study from its last finished epoch",
    "fit": "rerun it with --ckpt_path last to resume from its last finished epoch",
    "certify": "rerun the same command to resume the certification from its last saved image",
}

# What `certify` reads from its command; the network, the data and the noise are the study's.
CERTIFY_OPTIONS = {
    "out", "sigma", "n0", "n", "alpha", "images", "config", "print_config",
    "data.data_dir", "trainer.accelerator", "trainer.devices",
}  # fmt: skip

# Options of the one-run design that the study now sets per member, and what to use instead.
OWNED = {
    "data.noise_scale": "`--scales` (the study's noise levels, e.g. --scales '[1.0]')",
    "data.noise_seed": "`--seeds` (each member's seed draws its weights, noise, shuffle and dropout)",
    "seed_everything": "`--seeds` (each member's seed draws its weights, noise, shuffle and dropout)",
    "models": "`--model.net` (a study trains one network; run one study per network)",
}


GRAPHED_STEPS_PER_BATCH = 16  # training batches a graphed step is served at once: Lightning's loop once a block


def steps_per_batch(graphed: bool) -> int:
    """``data.steps_per_batch`` for ``model.graphed``: blocks of batches for the graphed step, else batch by batch."""
    return GRAPHED_STEPS_PER_BATCH if graphed else 1


def processes(trainer: Namespace) -> int:
    """How many processes a trainer with these options trains in, as far as its options and the environment say
    (a launcher's ``WORLD_SIZE``, ``devices``, ``num_nodes``; ``auto`` devices on CUDA: every GPU)."""
    devices = trainer.devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if devices in ("auto", "-1", -1):
        devices = torch.cuda.device_count() if uses_cuda(trainer.accelerator) else 1
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return max(count * int(trainer.num_nodes or 1), int(os.environ.get("WORLD_SIZE", 1)))


def trainer_defaults() -> dict:
    """Trainer settings of the study: 20 epochs, TensorBoard under ``tb_logs/``, a last checkpoint."""
    interactive = sys.stderr.isatty()
    return {
        "max_epochs": 20,
        "num_sanity_val_steps": 0,  # the study validates after every epoch anyway
        "log_every_n_steps": 1,  # nothing is logged per step; this only silences a warning about short epochs
        "enable_progress_bar": interactive,  # a log file gets one line per epoch instead
        "logger": {
            "class_path": "noise_robustness.run_logger.RunLogger",
            "init_args": {"save_dir": "tb_logs", "default_hp_metric": False},
        },
        "callbacks": [
            newest_checkpoint(),
            NoisySamples(),
            StudyHParams(),
            *([] if interactive else [EpochLines()]),
        ],
    }


def newest_checkpoint(dirpath: Path | None = None) -> ModelCheckpoint:
    """The newest epoch's state, to resume from, and ``last.ckpt`` linking to it (one write per epoch).

    No "best" checkpoint: each member has its own best. ``dirpath`` None: the run's folder.
    """
    return ModelCheckpoint(dirpath=dirpath, save_top_k=1, save_last="link")


def run_name(config: Namespace) -> str:
    """The experiment name of a run: its (last) config file's name, else ``scale_<σ>`` (one σ) or ``study``."""
    files = [os.fspath(path) for path in config.get("config") or [] if path is not None]
    if files:
        return os.path.splitext(os.path.basename(files[-1]))[0]
    return f"scale_{config.scales[0]}" if len(config.scales) == 1 else "study"


def last_checkpoint(save_dir: str, name: str) -> str:
    """The newest ``<save_dir>/<name>/version_<n>/checkpoints/last.ckpt``: what ``--ckpt_path last`` resumes."""
    found = [folder / "checkpoints" / "last.ckpt" for _, folder in sorted(run_folders(Path(save_dir, name)).items())]
    found = [path for path in found if path.is_file()]
    if not found:
        raise ValueError(
            "Expected a checkpoint to resume with `--ckpt_path last`, but found no "
            f"{Path(save_dir, name, 'version_*/checkpoints/last.ckpt')}"
        )
    return str(found[-1])


def check_checkpoint(path: str) -> None:
    """Raises ValueError unless ``path`` is a Lightning checkpoint file."""
    if not Path(path).is_file():
        raise ValueError(f"Expected `ckpt_path` to be a checkpoint file (or `last`), but {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(
            f"Expected `ckpt_path` to be a checkpoint file, but {path} is not one ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"Expected `ckpt_path` to be a checkpoint file, but {path} holds no `state_dict`")


def option_values(tokens: list[str], *flags: str) -> list[str]:
    """The values ``tokens`` give any of ``flags``, in order: ``FLAG V``, or ``--FLAG=V`` for a long flag."""
    values = []
    for token, following in zip(tokens, [*tokens[1:], None]):
        name, equals, value = token.partition("=")
        if equals and name.startswith("--") and name in flags:
            values.append(value)
        elif token in flags and following is not None:
            values.append(following)
    return values


def config_files(tokens: list[str]) -> list[str]:
    """The config files named in ``tokens``: ``-c F``, ``--config F`` or ``--config=F``."""
    return option_values(tokens, "-c", "--config")


def check_owned(tokens: list[str], configs: list[dict | None]) -> None:
    """Raises ValueError naming the study option to use for a study-owned key in ``tokens`` or a parsed config file."""
    given = {token[2:].split("=", 1)[0] for token in tokens if token.startswith("--")}
    for config in configs:
        given |= set(flatten(config or {}))
    for key, instead in OWNED.items():
        if key in given:
            raise ValueError(f"`{key}` is set per member by the study: use {instead} instead")
    if tokens and tokens[0] == "sweep" and "ckpt_path" in given:
        raise ValueError("`ckpt_path` is chosen by the study: rerun the same sweep command to resume it")
    if tokens and tokens[0] == "certify":
        unknown = sorted(given - CERTIFY_OPTIONS - {"help"})
        if unknown:
            raise ValueError(
                f"`{unknown[0]}` is not an option of `certify`: the network, data and noise are the study's (`--out`); "
                f"certify takes {', '.join(f'--{k}' for k in sorted(CERTIFY_OPTIONS - {'config', 'print_config'}))}"
            )


def check_corruptions(tokens: list[str], configs: list[dict | None]) -> None:
    """Builds every corruption named by ``--corruptions`` or ``--eval_corruptions`` (in ``tokens`` or a parsed config
    file), so that an unknown one, a bad severity or one named twice is one message naming the option.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    given = {}
    for key in ("corruptions", "eval_corruptions"):
        for config in configs:
            if isinstance(config, dict) and key in config:
                given[key] = config[key]
        typed = option_values(tokens, f"--{key}")
        if typed:  # the command line's last value wins over the config files'
            given[key] = yaml.safe_load(typed[-1])
    for key, specs in given.items():
        if specs is not None and not isinstance(specs, list):
            raise ValueError(f"Expected `{key}` to be a list of corruptions (or null), but got {specs!r}")
        if specs is not None:
            distinct(specs, key)


def with_epochs_alias(tokens: list[str]) -> list[str]:
    """``sweep --epochs N`` is ``--trainer.max_epochs N`` (the sweep's name for it)."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--epochs" and i + 1 < len(tokens):
            out.append(f"--trainer.max_epochs={tokens[i + 1]}")
            i += 2
            continue
        out.append("--trainer.max_epochs=" + token.split("=", 1)[1] if token.startswith("--epochs=") else token)
        i += 1
    return out


class StudyTrainer(pl.Trainer):
    """The Trainer, with the options of the study's ``sweep`` subcommand, and ``precision`` ``auto``.

    LightningCLI builds a subcommand's parser from the signature of the Trainer's method of that name,
    and runs the CLI's method of that name when the CLI has one: ``NoiseCLI.sweep`` runs the study, with
    these options as its arguments (``tests/test_cli.py`` fails if Lightning stops doing either).
    """

    def __init__(self, *, precision: PRECISION | Literal["auto"] = "auto", **kwargs):
        """``precision`` ``auto``: this machine's fast precision (``precision.fast_precision``); the command
        records which one it chose (``NoiseCLI.before_instantiate_classes``). The rest is Lightning's."""
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


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in a run's folder; a study writes its own into its folder instead."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "out" not in self.config:  # only a sweep has `out`
            super().setup(trainer, pl_module, stage)


class NoiseCLI(LightningCLI):
    """LightningCLI whose options name the study's members, with the ``sweep`` subcommand.

    Bad values found here or in the constructors end as one parser error, before any data is read
    or any folder is made.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "sweep": {"model", "datamodule"}, "certify": {"model", "datamodule"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # the sweep is the whole study by default; a fit is one member
            self.parser.set_defaults({"sweep.scales": STUDY_SCALES, "sweep.seeds": STUDY_SEEDS})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--scales",
            type=list[float],
            default=[0.0],
            help="The study's noise levels σ, in units of the [0, 1] pixel range.",
        )
        parser.add_argument("--seeds", type=list[int], default=[0], help="The study's seeds: one member per (σ, seed).")
        parser.add_argument(
            "--corruptions",
            type=list[Corruption] | None,
            default=None,
            help="What the members train on, each at its `severities` (null: the `--scales`); null: Gaussian noise. "
            f"One of {', '.join(cls.__name__ for cls in BUILT_IN.values())} by class_path (docs/corruptions.md).",
        )
        parser.link_arguments("model.graphed", "data.steps_per_batch", compute_fn=steps_per_batch)
        for target in ("data", "model"):
            parser.link_arguments("scales", f"{target}.scales")
            parser.link_arguments("seeds", f"{target}.seeds")
            parser.link_arguments("corruptions", f"{target}.corruptions")

    def parse_arguments(self, parser, args) -> None:
        tokens = list(sys.argv[1:] if args is None else args)
        configs = []
        for path in config_files(tokens):
            if not os.path.isfile(path):
                continue  # jsonargparse names a missing file itself
            text = Path(path).read_text()
            # jsonargparse answers an empty config file with a bare "Unexpected config:"; name the file.
            if not text.strip():
                parser.error(f"Expected the config file {path} to hold options, but it is empty")
            try:
                configs.append(yaml.safe_load(text))
            except yaml.YAMLError as err:  # jsonargparse gives line and column, not the file
                parser.error(
                    f"Expected the config file {path} to be YAML, but it does not parse: {err}".replace("\n", " ")
                )
        try:
            check_owned(tokens, configs)
            check_corruptions(tokens, configs)
        except (ValueError, yaml.YAMLError) as err:
            parser.error(str(err))
        if tokens and tokens[0] == "sweep":
            tokens = with_epochs_alias(tokens)
        self.config = parser.parse_args(tokens)  # what LightningCLI does, with the alias resolved
        ckpt_path = self.config.get(f"{self.config.get('subcommand')}.ckpt_path")
        if ckpt_path not in (None, "last"):  # before LightningCLI reads it, which fails with a traceback
            try:
                check_checkpoint(ckpt_path)
            except ValueError as err:
                parser.error(str(err))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        # the precision a run uses, never `auto`, is what its config, identity and checkpoints record
        config.trainer.precision = resolve_precision(config.trainer.precision, config.trainer.accelerator)
        try:
            if self.subcommand in ("fit", "sweep") and (
                config.trainer.max_epochs is None or config.trainer.max_epochs <= 0
            ):
                raise ValueError(
                    f"Expected `trainer.max_epochs` to be a positive integer, but got {config.trainer.max_epochs}"
                )
            if config.model.graphed and (count := processes(config.trainer)) > 1:
                raise ValueError(
                    f"`model.graphed` trains in one process, but this trainer runs {count} (DDP reduces gradients "
                    "outside the step's graph): leave `graphed` false, or run on one device"
                )
            if self.subcommand == "sweep":
                self.study = self.plan_study(config)
            elif self.subcommand == "certify":
                setting = Setting(config.n0, config.n, config.alpha, config.images, config.sigma)
                self.certifications = certification.plan(
                    [config.out] if isinstance(config.out, str) else config.out, setting
                )
            else:
                name_run(config)
                self.check_resumed_checkpoint(config)
        except ValueError as err:
            self.parser.error(str(err))

    def resolved(self) -> dict:
        """The command's full resolved config, nested as YAML writes it."""
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        return resolved[self.subcommand] if self.subcommand else resolved

    def check_resumed_checkpoint(self, config) -> None:
        """A ``fit`` resumes only a whole checkpoint written with its options; ``validate``, ``test`` and
        ``predict`` read only a whole one. Every checkpoint a ``fit`` writes records its options."""
        if self.subcommand != "fit" and not config.get("ckpt_path"):
            return  # nothing to record or check: no need to resolve the config
        resolved = self.resolved()
        members = {key: resolved[key] for key in ("scales", "seeds", "corruptions") if resolved.get(key) is not None}
        identity = identity_of(resolved) | members  # a run's checkpoint is of its members (Gaussian: no corruptions)
        if self.subcommand == "fit":
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], CheckpointRecord(identity)]
        if config.get("ckpt_path"):
            fit = self.subcommand == "fit"
            remedy = (
                "resume from a checkpoint of this run's options, or start a new run without --ckpt_path"
                if fit
                else "name another checkpoint"
            )
            checkpoints.verify(Path(config.ckpt_path), identity if fit else None, RESUMABLE_CHANGES, remedy)

    def plan_study(self, options) -> Study:
        """Checks a sweep against its folder and sets the classes to the members it trains; creates nothing.

        Raises:
            ValueError: bad study options, or a folder that holds another study or no study.
        """
        resolved = self.resolved()
        members = study_members(options.scales, options.seeds, options.corruptions)
        cells = evaluations(options.eval_corruptions, options.scales, members)
        study = Study(Path(options.out), identity_of(resolved), members, resolved, cells)
        to_train = study.to_train(options.task, options.gather)
        if str(options.trainer.devices) not in ("auto", "1") or options.trainer.num_nodes != 1:
            raise ValueError(
                "Expected `trainer.devices` and `trainer.num_nodes` to be 1 in a study, which trains its members side "
                f"by side in one process, but got {options.trainer.devices} and {options.trainer.num_nodes}; spread a "
                "study over devices as tasks, one seed each (--task, scripts/slurm_study.sh)"
            )
        study.check()
        for folder in options.compare or []:
            compared_rows(Path(folder), study.identity)
        if options.gather:
            study.finished_runs()  # nothing to train: a gather needs no GPU time to say what is missing
        train = to_train or study.members  # nothing to train: the classes are built, never fitted
        covering = covering_corruptions(train)
        for target in (options.data, options.model):  # a product of severities and seeds covering them
            target.scales, target.seeds, target.corruptions = scales_of(train), seeds_of(train), covering
        options.trainer.devices = 1  # "auto" would start DDP on a node with several GPUs
        options.trainer.logger = {
            "class_path": "noise_robustness.run_logger.RunLogger",
            "init_args": {"save_dir": str(study.out), "name": "tensorboard", "version": "", "default_hp_metric": False},
        }
        checkpoint_dir = study.checkpoint_dir(to_train)
        if (checkpoint_dir / "last.ckpt").is_file():  # what a rerun resumes: whole, and of this study
            remedy = f"delete {checkpoint_dir} to train {len(to_train)} member(s) from their first epoch"
            checkpoints.verify(checkpoint_dir / "last.ckpt", study.identity, set(), remedy)
        self.trainer_defaults["callbacks"] = [
            newest_checkpoint(checkpoint_dir) if isinstance(c, ModelCheckpoint) else c
            for c in self.trainer_defaults["callbacks"]
        ] + [CheckpointRecord(study.identity)]
        return study

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # our constructors' argument checks: a user error, not a bug
            self.parser.error(str(err))
        # cuDNN's fastest convolution gradients add with atomics, in a new order on every run; its
        # deterministic algorithms make a rerun on one machine type give the same numbers bit for bit
        # (docs/reproducibility.md). No effect on a CPU.
        torch.backends.cudnn.deterministic = True
        if self.subcommand:
            # Check the data files before the Trainer starts: a bad file then stops one process
            # cleanly, instead of rank zero alone inside DDP while the other ranks wait for it.
            self.datamodule.prepare_data()

    def sweep(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        out: str,
        task: int | None = None,
        gather: bool = False,
        compare: list[str] | None = None,
        eval_corruptions: list | None = None,
    ) -> None:
        """Runs the study in ``out`` (``self.study``, checked against that folder before the classes were built)."""
        run_study(self.trainer, model, datamodule, self.study, task, gather, [Path(folder) for folder in compare or []])

    def certify(self, model: pl.LightningModule, datamodule: pl.LightningDataModule, **setting) -> None:
        """Certifies the studies planned (and checked) before the classes were built, on the trainer's device."""
        try:
            certification.run(self.certifications, datamodule.hparams.data_dir, self.trainer.strategy.root_device)
        except ValueError as err:  # another command is certifying one of them
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)


def covering_corruptions(members: list) -> list[Namespace]:
    """Each corruption of ``members`` at exactly their severities (in their order), as config values: with their
    seeds, a product that covers ``members`` (severity 0, clean, is Gaussian noise's)."""
    by_corruption = {}
    for m in members:
        by_corruption.setdefault(m.corruption, []).append(m.noise_scale)
    return [
        Namespace(
            class_path=f"{type(c).__module__}.{type(c).__qualname__}",
            init_args=Namespace(severities=list(dict.fromkeys(levels))),
        )
        for c, levels in by_corruption.items()
    ]


def name_run(config: Namespace) -> None:
    """Names a run's TensorBoard experiment after its config file, and resolves ``--ckpt_path last``."""
    logger = config.trainer.logger
    if isinstance(logger, Namespace) and "name" in logger.init_args:
        args = logger.init_args
        if args.name == DEFAULT_RUN_NAME:
            args.name = run_name(config)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = last_checkpoint(args.save_dir, args.name)


def cli_main(args: list[str] | None = None, run: bool = True) -> NoiseCLI:
    """Runs the CLI on ``args`` (default: ``sys.argv``); tests call it in-process.

    A run stopped by SIGTERM (a scheduler's time limit) or SIGINT (Ctrl-C) says how to resume it and
    exits 128 + the signal's number; a file that cannot be written ends in one message naming it.
    """
    tokens = list(sys.argv[1:] if args is None else args)
    subcommand = tokens[0] if tokens else None
    with StopSignals() as stopped:
        try:
            cli = NoiseCLI(
                NoiseClassifier,
                NoisyMNISTDataModule,
                trainer_class=StudyTrainer,
                seed_everything_default=False,  # every seed is explicit: `--seeds`
                trainer_defaults=trainer_defaults(),
                save_config_callback=SaveRunConfig,
                save_config_kwargs={"overwrite": True},  # a run's folder is always new (claimed atomically)
                parser_kwargs={"prog": "python -m noise_robustness"},
                args=args,
                run=run,
            )
        except DataFileError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:  # a full disk, a folder made read-only: nothing finished is lost
            filename = err.filename2 or err.filename  # os.replace(temporary, file): the file
            where = f" ({filename})" if filename else ""
            print(
                f"error: {err.strerror or err}{where}; free space or fix the permissions, then "
                f"{RESUME.get(subcommand, 'run it again')}",
                file=sys.stderr,
            )
            sys.exit(1)
        except (KeyboardInterrupt, SystemExit):
            # Lightning ends a run stopped by Ctrl-C with sys.exit(1), and by SIGTERM with a SystemExit of code 0
            if stopped.signum is None:
                raise
        if stopped.signum is None:
            return cli
    # Stopped by a signal, even one that came as the last epoch ended: a scheduler must not see a success.
    hint = RESUME.get(subcommand, "run it again")
    print(f"[{subcommand}] stopped by {signal.Signals(stopped.signum).name}: {hint}", file=sys.stderr, flush=True)
    sys.exit(128 + stopped.signum)


class StopSignals:
    """SIGTERM and SIGINT, noted and turned into exceptions for the time of one command.

    Outside a Lightning run, SIGTERM raises ``SIGTERMException`` at once and SIGINT ``KeyboardInterrupt``.
    Inside one, Lightning's own SIGTERM handler stops the run at its next step (it calls this one too),
    and Lightning turns a ``KeyboardInterrupt`` into a graceful shutdown.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGTERM and signal.getsignal(signum) != self.handle:
            return  # called by Lightning's handler: the run stops at its next step
        raise SIGTERMException() if signum == signal.SIGTERM else KeyboardInterrupt()
