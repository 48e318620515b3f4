from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """A ResNet-style network for 3 x 32 x 32 images: a stem, one residual block, global average pooling."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = Block(channels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class LeNet(nn.Sequential):
    """LeNet-5 for 3 x 32 x 32 images, with batch norm and GELU: stacked by the engine."""

    def __init__(self, classes: int = 10):
        super().__init__(
            nn.Conv2d(3, 6, 5),
            nn.BatchNorm2d(6),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.BatchNorm2d(16),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.LayerNorm(120),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, classes),
        )
