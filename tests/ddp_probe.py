"""A callback for the DDP tests: saves what each rank trained on, and rank zero's final metrics."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class RecordBatches(pl.Callback):
    """Saves ``<out>/rank<r>_epoch<e>.pt``: this rank's training index batches and the images it was served."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_epoch_start(self, trainer, pl_module):
        self.indices, self.images = trainer.train_dataloader.batches(), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images.append(batch[0].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        record = {"indices": self.indices, "images": self.images, "world_size": trainer.world_size}
        torch.save(record, self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.item() for k, v in trainer.callback_metrics.items()}, self.out / "metrics.pt")
