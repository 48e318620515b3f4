"""Noisy MNIST as a LightningDataModule: whole-split tensors, noise from ``noise.py``."""

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch

from noise_robustness import mnist
from noise_robustness.noise import BLOCK, add_noise, check_noise_mode, check_noise_scale, derive_seed, standard_normal_block

IMAGE_SHAPE = (1, 28, 28)
N_TRAIN, N_TEST = 60_000, 10_000  # images in the MNIST train and test files


def shard_batches(order: torch.Tensor, rank: int, world_size: int, batch_size: int) -> list[torch.Tensor]:
    """Splits ``order`` into ``world_size`` disjoint shards and returns ``rank``'s shard in batches.

    The shards cover ``order`` exactly once (no padding, no duplicates); their sizes differ by at
    most one, and every rank gets the same number of batches, so DDP's collective calls stay in
    step. With one process the batches are plain ``batch_size`` chunks, the last one partial.
    """
    shards = torch.tensor_split(order, world_size)
    n_batches = math.ceil(len(shards[0]) / batch_size)  # shards[0] is a largest shard
    mine = shards[rank]
    if math.ceil(len(mine) / batch_size) == n_batches:
        return list(mine.split(batch_size))
    if len(mine) < n_batches:  # only with batch_size 1 (or shards of 0 and 1 images)
        raise ValueError(
            f"Cannot split {len(order)} images over {world_size} processes in batches of {batch_size} "
            "with the same number of batches on every process; use a batch_size of at least 2"
        )
    return list(torch.tensor_split(mine, n_batches))  # one image short: spread it, keep the batch count


class TensorBatches:
    """Serves ``(images[idx], labels[idx])`` batches from whole tensors: no per-sample Python, no collate.

    Args:
        images: the split's images, or a function of the epoch that returns them (``resample``).
        labels: the split's labels.
        batch_size: images per batch and process.
        position: returns ``(epoch, rank, world_size)`` when an epoch starts.
        shuffle_seed: shuffle each epoch with a permutation seeded by (seed, epoch), the same on
            every rank; ``None`` keeps the split's order.
    """

    def __init__(
        self,
        images: torch.Tensor | Callable[[int], torch.Tensor],
        labels: torch.Tensor,
        batch_size: int,
        position: Callable[[], tuple[int, int, int]],
        shuffle_seed: int | None = None,
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.position, self.shuffle_seed = position, shuffle_seed

    def batches(self) -> list[torch.Tensor]:
        """This epoch's index batches for this process."""
        epoch, rank, world_size = self.position()
        n = len(self.labels)
        if self.shuffle_seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("shuffle", self.shuffle_seed, epoch)))
        return shard_batches(order.to(self.labels.device), rank, world_size, self.batch_size)

    def __len__(self) -> int:
        _, _, world_size = self.position()
        return math.ceil(math.ceil(len(self.labels) / world_size) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.position()[0]
        images = self.images(epoch) if callable(self.images) else self.images
        for idx in self.batches():
            yield images[idx], self.labels[idx]


class NoisyMNISTDataModule(pl.LightningDataModule):
    """MNIST in [0, 1] with additive Gaussian noise of std ``noise_scale`` per image.

    Args:
        noise_scale: σ, in units of the [0, 1] pixel range (1.0 = the whole black-to-white range).
            0 gives the clean images. The original study's setting is ``255 * s``.
        noise_mode: ``fixed`` draws each image's noise once; ``resample`` draws training noise
            afresh each epoch (validation and test noise stay fixed, so epochs compare).
        clip: clip noisy pixels to [0, 1].
        noise_seed: seed of the noise; image ``i`` of a split always gets the same draw.
        batch_size: images per batch and process.
        val_holdout: 0 validates on the 10,000-image MNIST test split (as the original study and
            the Keras example do); N > 0 holds out N training images instead (seeded split).
        data_dir: where MNIST lives in torchvision's layout; the shipped copy is unpacked there.
        download: let torchvision download MNIST into ``data_dir`` if it is missing.
    """

    def __init__(
        self,
        noise_scale: float = 0.0,
        noise_mode: str = "fixed",
        clip: bool = False,
        noise_seed: int = 0,
        batch_size: int = 128,
        val_holdout: int = 0,
        data_dir: str = "data",
        download: bool = False,
    ):
        super().__init__()
        check_noise_scale(noise_scale)
        check_noise_mode(noise_mode)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}")
        if not 0 <= val_holdout < N_TRAIN:
            raise ValueError(f"Expected `val_holdout` to be in [0, {N_TRAIN}), but got {val_holdout}")
        if batch_size > N_TRAIN - val_holdout:
            raise ValueError(f"Expected `batch_size` to be at most the {N_TRAIN - val_holdout} training images, but got {batch_size}")
        self.save_hyperparameters()
        self._noisy_train: tuple[int, torch.Tensor] | None = None  # (noise epoch, images)

    # -- the data ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        mnist.prepare(self.hparams.data_dir, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "splits"):
            return
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        files = {name: mnist.load(str(Path(self.hparams.data_dir)), train=name == "train") for name in ("train", "test")}
        self.images = {name: x.to(device) for name, (x, _) in files.items()}  # uint8, kept once
        self.labels = {name: y.to(device) for name, (_, y) in files.items()}
        train_idx, val_idx = torch.arange(N_TRAIN), None
        if self.hparams.val_holdout:
            perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(derive_seed("holdout", self.hparams.noise_seed)))
            train_idx, val_idx = perm[self.hparams.val_holdout :].sort().values, perm[: self.hparams.val_holdout].sort().values
        # split name -> (MNIST file, indices into it); the noise of an image depends on its file index
        self.splits = {
            "train": ("train", train_idx.to(device)),
            "val": ("train", val_idx.to(device)) if val_idx is not None else ("test", torch.arange(N_TEST, device=device)),
            "test": ("test", torch.arange(N_TEST, device=device)),
        }
        self.shuffle_seed = torch.initial_seed()  # set by seed_everything, the same on every rank
        self.eval_images = {"val": self.noisy("val")}
        same = self.splits["val"][0] == "test"  # validating on the test split: one tensor serves both
        self.eval_images["test"] = self.eval_images["val"] if same else self.noisy("test")

    def clean(self, split: str, count: int | None = None) -> torch.Tensor:
        """The split's first ``count`` (default: all) clean images as float32 in [0, 1]."""
        file, idx = self.splits[split]
        return self.images[file][idx[:count]].float().div_(255)

    def noisy(self, split: str, noise_scale: float | None = None, epoch: int = 0) -> torch.Tensor:
        """The split's images with noise at ``noise_scale`` (default: this module's σ)."""
        sigma = self.hparams.noise_scale if noise_scale is None else noise_scale
        file, idx = self.splits[split]
        images = self.images[file]
        # Block by block, so the whole split never exists as clean floats, noise and sum at once.
        out = torch.empty(images.shape, device=images.device)
        for block, start in enumerate(range(0, len(images), BLOCK)):
            clean = images[start : start + BLOCK].float().div_(255)
            z = None
            if sigma != 0:  # σ = 0 needs no draw: the clean images, exactly
                z = standard_normal_block(block, IMAGE_SHAPE, self.hparams.noise_seed, file, epoch, images.device)[: len(clean)]
            out[start : start + BLOCK] = add_noise(clean, sigma, z, self.hparams.clip)
        return out if len(idx) == len(images) else out[idx]  # a split is the whole file or a sorted subset

    def train_images(self, epoch: int) -> torch.Tensor:
        """Noisy training images for ``epoch``: one draw in ``fixed`` mode, a new draw per epoch in ``resample``."""
        noise_epoch = epoch if self.hparams.noise_mode == "resample" else 0
        if self._noisy_train is None or self._noisy_train[0] != noise_epoch:
            self._noisy_train = None  # free the old draw before making the new one
            self._noisy_train = (noise_epoch, self.noisy("train", epoch=noise_epoch))
        return self._noisy_train[1]

    # -- the loaders ------------------------------------------------------------------------------

    def _position(self) -> tuple[int, int, int]:
        trainer = self.trainer
        return (trainer.current_epoch, trainer.global_rank, trainer.world_size) if trainer else (0, 0, 1)

    def split_labels(self, split: str) -> torch.Tensor:
        """The labels of the split's images, in the order of ``noisy(split)``."""
        file, idx = self.splits[split]
        return self.labels[file][idx]

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(self.train_images, self.split_labels("train"), self.hparams.batch_size, self._position, self.shuffle_seed)

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(self.eval_images["val"], self.split_labels("val"), self.hparams.batch_size, self._position)

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(self.eval_images["test"], self.split_labels("test"), self.hparams.batch_size, self._position)

    def predict_dataloader(self) -> TensorBatches:
        return self.val_dataloader()

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Batches are indexed out of tensors that setup() already put on the device: skip
        # Lightning's generic (and per-step costly) walk over the batch when nothing needs moving.
        if all(t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
