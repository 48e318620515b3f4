"""The LightningModule: trains any ``net`` with cross-entropy and logs loss and accuracy per stage."""

import pytorch_lightning as pl
import torch
from jsonargparse import lazy_instance
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from noise_robustness.models import DropoutMLP
from noise_robustness.noise import derive_seed


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
        # one metric object per stage, so their states never mix
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def on_fit_start(self) -> None:
        self.run_seed = torch.initial_seed()  # set by seed_everything, so the same when a run resumes

    def on_train_epoch_start(self) -> None:
        # Dropout draws from torch's global RNG. Seeding it per (run seed, epoch, rank) gives an epoch
        # the same masks whether or not the run was interrupted and resumed before it.
        torch.manual_seed(derive_seed("dropout", self.run_seed, self.current_epoch, self.global_rank))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of one batch; updates and logs the stage's loss and accuracy (per epoch)."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "test")
        return loss

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
