"""The Lightning layer: the LightningModule that trains every member, its callbacks, logger and checkpoints."""
