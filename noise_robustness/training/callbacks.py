"""What a run writes besides its metrics: sample images, the HParams entry, and a line per epoch."""

import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torchvision.utils import make_grid

from noise_robustness.machine import UNRECORDED, fingerprint
from noise_robustness.study.members import Member, network_name
from noise_robustness.training import checkpoints


def member_loggers(trainer: pl.Trainer, method: str) -> list:
    """The run's loggers that log per member with ``method`` (RunLogger, MemberRuns), on rank zero only."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if callable(getattr(logger, method, None))]


def sample_grid(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """A grid of clean images (top rows) above the same images with noise (bottom rows).

    Noisy pixels are shown clipped to [0, 1]: the picture shows what the network gets, within
    what a screen can show.
    """
    images = torch.cat([clean, noisy.clamp(0, 1)]).float().cpu()
    return make_grid(images, nrow=8, padding=2, pad_value=0.5)


class NoisySamples(pl.Callback):
    """Logs, into each member's run, grids of its first ``n`` training and validation images, clean above noisy."""

    def __init__(self, n: int = 16):
        self.n = n

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = member_loggers(trainer, "log_member_image")
        if not loggers:
            return
        members, dm = pl_module.members, trainer.datamodule
        clean_members = [Member(0.0, m.seed) for m in members]
        positions = {m.seed: torch.arange(self.n, device=dm.device) for m in members}  # split order: no shuffle
        for split in ("train", "val"):
            noisy, _ = dm.noisy_images(split, positions, members)
            clean, _ = dm.noisy_images(split, positions, clean_members)
            for k, member in enumerate(members):
                grid = sample_grid(clean[k], noisy[k])
                for logger in loggers:
                    logger.log_member_image(member, members, f"{split}/samples_clean_above_noisy", grid)


class StudyHParams(pl.Callback):
    """Puts each member's σ, seed and the study's settings in TensorBoard's HParams view, against its final metrics."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = member_loggers(trainer, "log_member_hparams")
        if not loggers:
            return
        data = trainer.datamodule.hparams
        constants = {
            "network": network_name(type(pl_module.net.member(0))),
            "noise_mode": data["noise_mode"],
            "clip": bool(data["clip"]),
            "epochs": int(trainer.max_epochs),
            "batch_size": int(data["batch_size"]),
            "lr": float(pl_module.lr),
        }
        for logger in loggers:
            logger.log_member_hparams(pl_module.members, constants)


def duration(seconds: float) -> str:
    """``42 s``, ``7 min 05 s``, ``1 h 12 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EpochLines(pl.Callback):
    """One line per epoch on stderr, with the time the remaining epochs will take at this run's pace so far: above the
    progress bar in a terminal, the only progress in a log file (where no bar is drawn)."""

    def __init__(self):
        self.epochs: list[float] = []  # seconds of each epoch this process trained, validation included

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # validation ran before the training epoch ends, so this is this epoch's val/acc
        val = pl_module.epoch_metrics.get("val/acc")
        text = (
            f"val/acc {val.mean():.4f} mean of {len(val)} member(s) [{val.min():.4f}, {val.max():.4f}]"
            if val is not None
            else ""
        )
        seconds = time.perf_counter() - self.start
        self.epochs.append(seconds)
        left = (trainer.max_epochs - trainer.current_epoch - 1) * sum(self.epochs) / len(self.epochs)
        pace = f"about {duration(left)} left" if left else "the last epoch"
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        line = f"{epoch}: {seconds:.1f} s, {pace}  {text}"
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled and sys.stderr.isatty():  # above a progress bar, which redraws below it
            bar.print(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


class CheckpointRecord(pl.Callback):
    """Records in every checkpoint the options that decide its results, the last epoch's metrics and a
    checksum (``checkpoints.py``); restores the metrics when a checkpoint is resumed, so that a run stopped
    after its last epoch still reports them.

    Args:
        identity: the options of the run (or study) that decide its results.
    """

    def __init__(self, identity: dict):
        self.identity = identity
        # where the members were trained: ``machine.fingerprint`` and the first epoch trained there, one entry per
        # machine a resumed run moved to (a requeued task on another node of a cluster); restored with the state
        self.trained_on: list[dict] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        here = fingerprint(pl_module.device, trainer.precision)
        if not self.trained_on or {k: v for k, v in self.trained_on[-1].items() if k != "from_epoch"} != here:
            self.trained_on.append({"from_epoch": trainer.current_epoch + 1, **here})

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
            trainer.strategy.checkpoint_io = checkpoints.FileCheckpointIO()  # written as it goes, not first in memory

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        members = [m.name for m in pl_module.members]
        checkpoints.record(checkpoint, self.identity, pl_module.epoch_metrics, members, self.trained_on)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        kept = checkpoint.get(checkpoints.RECORD)
        if kept:
            pl_module.epoch_metrics = {k: v.to(pl_module.device) for k, v in kept["epoch_metrics"].items()}
            # a checkpoint written before machines were recorded: its epochs' machine is unknown, and says so
            self.trained_on = list(kept.get("trained_on", [{"from_epoch": 1, "precision": UNRECORDED}]))
