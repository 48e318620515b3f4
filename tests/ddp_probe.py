"""A callback for the DDP tests: saves what each rank trained on, and rank zero's final metrics per member."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class RecordBatches(pl.Callback):
    """Saves ``<out>/rank<r>_epoch<e>.pt``: this rank's position batches per seed and the images it was served."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_epoch_start(self, trainer, pl_module):
        self.positions = trainer.train_dataloader.batches(
            trainer.current_epoch, trainer.global_rank, trainer.world_size
        )
        self.images = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images.append(batch[0].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        record = {"positions": self.positions, "images": self.images, "world_size": trainer.world_size}
        torch.save(record, self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.tolist() for k, v in pl_module.epoch_metrics.items()}, self.out / "metrics.pt")
