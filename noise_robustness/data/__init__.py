"""The data: MNIST's files, the per-image noise as pure functions, and the DataModule that composes them."""
