"""The networks under study, as plain ``nn.Module``s; chosen in a config by ``class_path``."""

import torch
from torch import nn


def keras_init(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases, the Keras defaults, on every dense and conv layer."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


class DropoutMLP(nn.Sequential):
    """The classic Keras ``mnist_mlp``: 784-512-512-10, ReLU, dropout after each hidden layer."""

    def __init__(self, hidden: int = 512, dropout: float = 0.2):
        super().__init__(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )
        keras_init(self)


class KerasCNN(nn.Sequential):
    """The classic Keras ``mnist_cnn``: conv 32 3x3, conv 64 3x3, max-pool 2, dense 128, dense 10."""

    def __init__(self, conv_dropout: float = 0.25, dense_dropout: float = 0.5):
        super().__init__(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(conv_dropout),
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128),
            nn.ReLU(),
            nn.Dropout(dense_dropout),
            nn.Linear(128, 10),
        )
        keras_init(self)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, on images ``[..., C, H, W]`` in [0, 1]: ``--model.normalize`` puts it before
    every member's network, after the noise (which is in [0, 1] pixel units, the unit of σ)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
            raise ValueError(f"Expected `normalize` to give a mean and a std > 0 per channel, but got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std
