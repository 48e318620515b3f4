"""What a run writes to TensorBoard besides its scalars: sample images and the HParams entry."""

import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid


def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger on rank zero, else None (only rank zero writes)."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def sample_grid(clean: torch.Tensor, noisy: torch.Tensor, n: int = 16) -> torch.Tensor:
    """A grid of ``n`` clean images (top rows) above the same images with noise (bottom rows).

    Noisy pixels are shown clipped to [0, 1]: the picture shows what the network gets, within
    what a screen can show.
    """
    images = torch.cat([clean[:n], noisy[:n].clamp(0, 1)]).float().cpu()
    return make_grid(images, nrow=8, padding=2, pad_value=0.5)


class NoisySamples(pl.Callback):
    """Logs grids of the first ``n`` training and validation images, clean above noisy."""

    def __init__(self, n: int = 16):
        self.n = n

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None:
            return
        dm = trainer.datamodule
        for split, noisy in (("train", dm.train_images(0)), ("val", dm.eval_images["val"])):
            grid = sample_grid(dm.clean(split, self.n), noisy[: self.n], self.n)
            logger.experiment.add_image(f"samples/{split}_clean_above_noisy", grid, global_step=0)


class HParamsSummary(pl.Callback):
    """Puts the run's noise settings and final metrics in TensorBoard's HParams view.

    The metric columns point at the logged scalars (``train/acc``, ``val/acc`` ...), whose last
    value TensorBoard shows, so no placeholder value is ever written to the curves.
    """

    METRICS = ("train/acc", "val/acc", "train/loss", "val/loss")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None:
            return
        data = dict(trainer.datamodule.hparams)
        params = {
            "model": type(getattr(pl_module, "net", pl_module)).__name__,
            "noise_scale": float(data["noise_scale"]),
            "noise_mode": data["noise_mode"],
            "clip": bool(data["clip"]),
            "noise_seed": int(data["noise_seed"]),
            "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
            "batch_size": int(data["batch_size"]),
            "max_epochs": int(trainer.max_epochs),
        }
        writer = logger.experiment._get_file_writer()  # the public add_hparams would start a new run folder
        for summary in hparams(params, {name: 0.0 for name in self.METRICS}):
            writer.add_summary(summary)
