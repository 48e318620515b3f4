"""The LightningModule: trains any ``net`` with cross-entropy and logs loss and accuracy per stage."""

import pytorch_lightning as pl
import torch
from jsonargparse import lazy_instance
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from noise_robustness.models import DropoutMLP
from noise_robustness.noise import derive_seed

STAGES = ("train", "val", "test")


class NoiseClassifier(pl.LightningModule):
    """A 10-class image classifier trained with RMSprop (Keras defaults).

    Args:
        net: the network, chosen in a config by ``class_path`` (default: the dropout MLP).
        lr: RMSprop learning rate.
        rho: RMSprop decay of the squared-gradient average (PyTorch calls it ``alpha``).
        eps: RMSprop epsilon, added to the root mean square (1e-7 in Keras, 1e-8 in PyTorch).
    """

    def __init__(self, net: nn.Module = lazy_instance(DropoutMLP), lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7):
        super().__init__()
        self.save_hyperparameters()
        self.net = net
        # One pair of metric objects per stage, so their states never mix. They are updated every
        # step and logged once per epoch: logging a Metric every step costs Lightning ~1 ms a step.
        for stage in STAGES:
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes=10, average="micro", validate_args=False))
            # no NaN check: on a GPU it would wait for every step to finish
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))

    def on_fit_start(self) -> None:
        self.run_seed = torch.initial_seed()  # set by seed_everything, so the same when a run resumes

    def on_train_epoch_start(self) -> None:
        # Dropout draws from torch's global RNG. Seeding it per (run seed, epoch, rank) gives an epoch
        # the same masks whether or not the run was interrupted and resumed before it.
        torch.manual_seed(derive_seed("dropout", self.run_seed, self.current_epoch, self.global_rank))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of one batch; updates the stage's running loss and accuracy."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        getattr(self, f"{stage}_acc").update(logits, labels)
        # One value per image weights the mean by batch size (torchmetrics 1.9 ignores `weight`
        # when nan_strategy="disable", so the weight cannot be passed as such).
        getattr(self, f"{stage}_loss").update(loss.detach().expand(len(labels)))
        return loss

    def log_epoch(self, stage: str) -> None:
        """Logs ``<stage>/loss`` and ``<stage>/acc`` over the epoch (reduced across DDP ranks, then reset)."""
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), prog_bar=stage != "test")

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.parameters(), lr=self.hparams.lr, alpha=self.hparams.rho, eps=self.hparams.eps)
