"""A callback that times each training epoch and its validation, for the benchmark."""

import json
import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Records ``{"train": s, "val": s}`` per epoch (wall seconds); appends them to ``log_file`` if given."""

    def __init__(self, log_file: str | None = None):
        self.log_file, self.epochs = log_file, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.val_start, self.val_end = time.perf_counter(), None, None

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.val_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        end = time.perf_counter()
        val = self.val_end - self.val_start if self.val_start else 0.0
        self.epochs.append({"train": end - self.start - val, "val": val})
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(self.epochs[-1]) + "\n")
