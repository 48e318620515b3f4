"""Small datasets in the real formats, written by tests (no machine here downloads one): IDX files in torchvision's
layout for the MNIST family, and image folders of PNGs (torchvision's ImageFolder)."""

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noise_robustness.data import mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as an IDX file: magic (0, 0, 8 for unsigned bytes, dims), the sizes big-endian, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def mnist_family(root: Path, folder: str, data_dir: str, train: int = 1000, test: int = 300) -> Path:
    """A member of the MNIST family (``folder``: FashionMNIST, KMNIST, ...) in torchvision's raw layout, holding real
    MNIST digits: ``train`` and ``test`` images of them."""
    raw = root / folder / "raw"
    for prefix, count, is_train in (("train", train, True), ("t10k", test, False)):
        images, labels = mnist.load(data_dir, train=is_train)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:count, 0].numpy())
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[:count].numpy().astype(np.uint8))
    return root


def colour(grey: torch.Tensor) -> torch.Tensor:
    """``[n, 1, 28, 28]`` digits (uint8) -> ``[n, 3, 32, 32]`` colour images: padded by 2, three channels unalike."""
    x = torch.nn.functional.pad(grey.float() / 255, (2, 2, 2, 2))
    rgb = torch.cat([x, x.flip(-1) * 0.7 + 0.1, (1 - x) * 0.6], dim=1)
    return (rgb * 255).round().to(torch.uint8)


def image_folder(root: Path, data_dir: str, train: int = 600, test: int = 200, subfolders: bool = True) -> Path:
    """A CIFAR-10-shaped image folder (3 x 32 x 32 PNGs, a folder per class) of colour digits: ``train/`` and
    ``test/`` subfolders, or one folder of ``train`` images."""
    for split, count, is_train in (("train", train, True), ("test", test, False)):
        if not count:
            continue
        images, labels = mnist.load(data_dir, train=is_train)
        folder = root / split if subfolders else root
        for i, (image, label) in enumerate(zip(colour(images[:count]), labels[:count])):
            path = folder / f"class_{int(label)}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return root
