"""A callback for the interruption tests: sends this process a real signal in the middle of an epoch, or as it ends."""

import os

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process after training batch ``batch`` of epoch ``epoch``.

    ``batch=-1``: as epoch ``epoch`` ends, after its validation and before its checkpoint is written (Lightning
    calls this callback's ``on_train_epoch_end`` before the checkpoint's).
    """

    def __init__(self, signum: int, epoch: int, batch: int):
        self.signum, self.epoch, self.batch = signum, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch, -1) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)
