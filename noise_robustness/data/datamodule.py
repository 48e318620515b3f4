"""Noisy MNIST for a study's members, as a LightningDataModule: whole-split tensors, noise from ``data/noise.py``.

The clean images are kept once (uint8) and one standard-normal pattern per noise seed (and epoch,
in ``resample`` mode); a batch for member k is composed when it is served, as
``clean[idx] + σ_k · z_seed(k)[idx]``, so K members never cost K noisy copies of the data.
"""

import functools
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch

from noise_robustness.corruptions import Corruption
from noise_robustness.data import datasets, mnist
from noise_robustness.data.batches import MemberBatches, gather_rows
from noise_robustness.data.noise import check_noise_mode, draw, seeded
from noise_robustness.study.members import Member, study_members

IMAGE_SHAPE = (1, 28, 28)  # MNIST's; another dataset's are its own (``image_shape``)
N_TRAIN, N_TEST = 60_000, 10_000  # images in the MNIST train and test files
HOLDOUT_SEED = 0  # one validation hold-out for the whole study, so every member is scored on the same images


def training_images(dataset: str | dict | None, data_dir: str, download: bool, val_holdout: int) -> int:
    """How many images a study trains on: MNIST's 60,000 (not read), or another dataset's training file (read, once
    per process), less the held-out ones."""
    n_train = N_TRAIN if dataset is None else len(datasets.load(dataset, data_dir, download)["train"][0])
    return n_train - val_holdout


def check_split_sizes(n_train: int, val_holdout: int, batch_size: int, has_test: bool) -> None:
    """Raises ValueError naming ``val_holdout`` or ``batch_size`` where the training file cannot serve them."""
    if not 0 <= val_holdout < n_train:
        raise ValueError(f"Expected `val_holdout` to be in [0, {n_train}), but got {val_holdout}")
    if not has_test and not val_holdout:
        raise ValueError(
            "Expected `val_holdout` to be above 0 for a dataset without a test file (an image folder without a test/ "
            "or val/ subfolder), but got 0: hold out some training images to validate on"
        )
    if batch_size > n_train - val_holdout:
        raise ValueError(
            f"Expected `batch_size` to be at most the {n_train - val_holdout} training images, but got {batch_size}"
        )


class Group(NamedTuple):
    """The members of one corruption in a batch of an MNIST file: their positions among the members, where their
    seeds' patterns start in the file's flattened pattern tables (``[G, 1]``: row ``s · images`` for seed row ``s``
    of ``patterns``), their severities ``[G, 1, 1, 1, 1]``, and whether any severity is above 0."""

    corruption: Corruption
    members: torch.Tensor
    pattern_starts: torch.Tensor
    severity: torch.Tensor
    corrupts: bool


class NoisyMNISTDataModule(pl.LightningDataModule):
    """MNIST (or another dataset, ``dataset``) in [0, 1] with additive Gaussian noise (or another corruption), for every
    member of a study.

    Args:
        scales: the study's noise levels σ, in units of the [0, 1] pixel range (1.0 = the whole
            black-to-white range); set by the study's ``--scales``.
        seeds: the study's seeds; seed s draws the noise pattern and the shuffle order of its
            members; set by the study's ``--seeds``.
        corruptions: what the members train on, each at its severities (default: Gaussian noise at the
            ``scales``); set by the study's ``--corruptions``.
        members: the names of the members to serve (``sigma=0.5/seed=0``), among every (corruption, severity,
            seed) of the options above; null: all of them. ``sweep`` sets it to the members it trains.
        noise_mode: ``fixed`` draws each image's noise once; ``resample`` draws training noise
            afresh each epoch (validation and test noise stay fixed, so epochs compare).
        clip: clip noisy pixels to [0, 1].
        batch_size: images per batch; with DDP, split over the processes (each member's gradient is the batch's mean).
        val_holdout: 0 validates on the 10,000-image MNIST test split (as the original study and
            the Keras example do); N > 0 holds out N training images instead (one seeded split).
        data_dir: where MNIST lives in torchvision's layout (the shipped copy is unpacked there), or another
            dataset's ``root``.
        download: let torchvision download the dataset into ``data_dir`` if it is missing.
        dataset: null: MNIST as shipped. A torchvision dataset class (``torchvision.datasets.CIFAR10``), or
            ``{class_path, init_args}`` with arguments that change the data (EMNIST's ``split``), or an image folder
            (``torchvision.datasets.ImageFolder``: ``train/`` and ``test/`` subfolders of ``data_dir``, or one folder
            validated on ``val_holdout`` images); read from ``data_dir`` (``data/datasets.py``).
        steps_per_batch: training batches served as one block (``MemberBatches``), which the graphed step trains
            batch by batch; set from ``--model.graphed`` (``commands.GRAPHED_STEPS_PER_BATCH``). Lightning's
            per-batch work (its hooks, ``limit_train_batches``, the progress bar) then counts blocks.
    """

    def __init__(
        self,
        scales: list[float] = [0.0],
        seeds: list[int] = [0],
        corruptions: list[Corruption] | None = None,
        members: list[str] | None = None,
        noise_mode: str = "fixed",
        clip: bool = False,
        batch_size: int = 128,
        val_holdout: int = 0,
        data_dir: str = "data",
        download: bool = False,
        steps_per_batch: int = 1,
        dataset: str | dict | None = None,
    ):
        super().__init__()
        self.members = study_members(scales, seeds, corruptions, members)
        check_noise_mode(noise_mode)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}")
        if isinstance(steps_per_batch, bool) or not isinstance(steps_per_batch, int) or steps_per_batch <= 0:
            raise ValueError(f"Expected `steps_per_batch` to be a positive integer, but got {steps_per_batch!r}")
        if dataset is None:
            check_split_sizes(N_TRAIN, val_holdout, batch_size, has_test=True)
        else:  # its sizes are checked when it is read
            datasets.dataset_class(datasets.spec_of(dataset))
            if val_holdout < 0:
                raise ValueError(f"Expected `val_holdout` to be at least 0, but got {val_holdout}")
        self.save_hyperparameters(ignore=["corruptions"])  # its members hold them; a checkpoint keeps plain values
        self._patterns: dict[tuple[str, str, int], torch.Tensor] = {}  # (kind, file, noise epoch) -> every seed's
        self._member_groups: dict[tuple, tuple] = {}  # (members, file) -> their groups (member_groups)

    # -- the data ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.hparams.dataset is None:
            mnist.prepare(self.hparams.data_dir, self.hparams.download)
        else:
            self.files()

    def files(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The data's ``"train"`` and ``"test"`` files as ``(uint8 images [N, C, H, W], labels [N])``, read once per
        process (an image folder without a test subfolder has no ``"test"``), their sizes checked.

        Raises:
            ValueError: naming the option whose value the data cannot serve.
        """
        hp = self.hparams
        if hp.dataset is None:
            data_dir = str(Path(hp.data_dir))
            return {name: mnist.load(data_dir, train=name == "train") for name in ("train", "test")}
        files = datasets.load(hp.dataset, hp.data_dir, hp.download)
        check_split_sizes(len(files["train"][0]), hp.val_holdout, hp.batch_size, has_test=files["test"] is not None)
        return {name: found for name, found in files.items() if found is not None}

    @property
    def name(self) -> str:
        """The data's name in messages: MNIST, or its dataset class's (``ImageFolder``)."""
        return (
            "MNIST"
            if self.hparams.dataset is None
            else datasets.spec_of(self.hparams.dataset)["class_path"].split(".")[-1]
        )

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the data's images."""
        return IMAGE_SHAPE if self.hparams.dataset is None else tuple(self.files()["train"][0].shape[1:])

    @property
    def classes(self) -> int:
        """How many classes the labels name: one more than the largest label."""
        return 10 if self.hparams.dataset is None else max(int(y.max()) for _, y in self.files().values()) + 1

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "splits"):
            return
        self.device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        files = self.files()
        self.images = {name: x.to(self.device) for name, (x, _) in files.items()}  # uint8, kept once
        self.file_labels = {name: y.to(self.device) for name, (_, y) in files.items()}
        n_train = len(self.images["train"])
        train_idx, val_idx = torch.arange(n_train), None
        if self.hparams.val_holdout:
            perm = seeded(torch.randperm, n_train, "holdout", HOLDOUT_SEED)
            train_idx, val_idx = (
                perm[self.hparams.val_holdout :].sort().values,
                perm[: self.hparams.val_holdout].sort().values,
            )
        # split name -> (MNIST file, indices into it); the noise of an image depends on its file index
        val = ("train", val_idx.to(self.device)) if val_idx is not None else None
        test = ("test", torch.arange(len(self.images["test"]), device=self.device)) if "test" in files else val
        self.splits = {"train": ("train", train_idx.to(self.device)), "val": val or test, "test": test}

    def patterns(self, file: str, noise_epoch: int, kind: str = "normal") -> torch.Tensor:
        """The ``kind`` patterns (standard-normal or uniform, ``noise.draw``) of every image of an MNIST ``file``, one
        per study seed, drawn once and kept: ``[seeds, images, C, H, W]``, row ``i`` for ``hparams.seeds[i]``."""
        key = (kind, file, noise_epoch)
        if key not in self._patterns:
            # keep the fixed draws (epoch 0: validation and test) and this epoch's; free the rest first
            self._patterns = {k: z for k, z in self._patterns.items() if k[2] in (0, noise_epoch)}
            n, seeds = len(self.images[file]), self.hparams.seeds
            shape = tuple(self.images[file].shape[1:])
            patterns = torch.empty((len(seeds), n, *shape), device=self.device)
            for row, seed in enumerate(seeds):
                draw(kind, n, shape, seed, file, noise_epoch, self.device, out=patterns[row])
            self._patterns[key] = patterns
        return self._patterns[key]

    def split_size(self, split: str) -> int:
        return len(self.splits[split][1])

    def labels(self, split: str) -> torch.Tensor:
        """The split's labels, in split order."""
        file, idx = self.splits[split]
        return self.file_labels[file][idx]

    def noisy_images(
        self, split: str, positions: dict[int, torch.Tensor], members: list[Member] | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at split ``positions[seed]`` for each member (default: the study's), corrupted now.

        Returns:
            ``(images [K, n, C, H, W], labels [K, n])``. Member (corruption, severity, s) gets the clean images
            at ``positions[s]`` corrupted at its severity from seed s's patterns (this epoch's for training in
            ``resample`` mode): for Gaussian noise, the clean images plus σ times seed s's pattern.
        """
        return self.corrupted(split, self.file_rows(split, positions, members), members, epoch)

    def file_rows(
        self, split: str, positions: dict[int, torch.Tensor], members: list[Member] | None = None
    ) -> torch.Tensor:
        """``[K, n]``: member k's MNIST file rows, the split's ``positions[seed]`` for its seed."""
        members = self.members if members is None else members
        seeds = list(positions)
        by_seed = torch.tensor([seeds.index(m.seed) for m in members], device=self.device)
        return self.splits[split][1][torch.stack([positions[seed] for seed in seeds])][by_seed]

    def corrupted(
        self, split: str, rows: torch.Tensor, members: list[Member] | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``noisy_images`` at each member's file ``rows`` ``[K, n]`` (``file_rows``): one gather per tensor for
        every member of a corruption (clean pixels, labels, and the patterns it reads)."""
        members = self.members if members is None else members
        file = self.splits[split][0]
        noise_epoch = epoch if split == "train" and self.hparams.noise_mode == "resample" else 0
        groups, order = self.member_groups(tuple(members), file)
        clean = torch.div(gather_rows(self.images[file], rows), 255.0)  # uint8 -> float32 in [0, 1], one operation
        corrupted = []
        for group in groups:
            images, group_rows = (clean, rows) if len(groups) == 1 else (clean[group.members], rows[group.members])
            if not group.corrupts:  # every severity 0: the clean images
                corrupted.append(images)
                continue
            patterns = {}
            for kind in group.corruption.patterns:
                table = self.patterns(file, noise_epoch, kind).flatten(0, 1)  # [seeds * images, ...]
                patterns[kind] = gather_rows(table, group.pattern_starts + group_rows)
            corrupted.append(group.corruption(images, group.severity, **patterns))
        images = corrupted[0] if len(groups) == 1 else torch.cat(corrupted)[order]
        return images.clamp(0.0, 1.0) if self.hparams.clip else images, self.file_labels[file][rows]

    def member_groups(self, members: tuple[Member, ...], file: str) -> tuple[list[Group], torch.Tensor | None]:
        """The members grouped by corruption (``Group``) for a batch of MNIST ``file``, and where each member's
        images sit among the groups' (None for one group). On the data's device, made once per set of members and
        file, not per batch."""
        if (members, file) not in self._member_groups:
            study_seeds, images = self.hparams.seeds, len(self.images[file])
            corruptions = list(dict.fromkeys(m.corruption for m in members))
            groups, positions = [], []
            for corruption in corruptions:
                ks = [k for k, m in enumerate(members) if m.corruption == corruption]
                levels = [members[k].noise_scale for k in ks]
                groups.append(
                    Group(
                        corruption,
                        torch.tensor(ks, device=self.device),
                        torch.tensor([[study_seeds.index(members[k].seed) * images] for k in ks], device=self.device),
                        torch.tensor(levels, device=self.device).view(-1, 1, 1, 1, 1),
                        any(levels),
                    )
                )
                positions += ks
            order = torch.argsort(torch.tensor(positions, device=self.device)) if len(groups) > 1 else None
            self._member_groups[members, file] = groups, order
        return self._member_groups[members, file]

    # -- the loaders ------------------------------------------------------------------------------

    def _position(self) -> tuple[int, int, int]:
        trainer = self.trainer
        return (trainer.current_epoch, trainer.global_rank, trainer.world_size) if trainer else (0, 0, 1)

    def loader(
        self, split: str, members: list[Member] | None = None, shuffle: bool = False, steps: int = 1
    ) -> MemberBatches:
        """Batches of ``split`` for ``members`` (default: the study's), in blocks of ``steps`` batches."""
        seeds = sorted({m.seed for m in (members or self.members)})
        rows = functools.partial(self.file_rows, split, members=members)
        compose = functools.partial(self.corrupted, split, members=members)
        size, batch_size = self.split_size(split), self.hparams.batch_size
        return MemberBatches(rows, compose, size, seeds, batch_size, self._position, shuffle, self.device, steps)

    def train_dataloader(self) -> MemberBatches:
        return self.loader("train", shuffle=True, steps=self.hparams.steps_per_batch)

    def val_dataloader(self) -> MemberBatches:
        return self.loader("val")

    def test_dataloader(self) -> MemberBatches:
        return self.loader("test")

    def predict_dataloader(self) -> MemberBatches:
        return self.loader("val")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Batches are composed from tensors that setup() already put on the device: skip
        # Lightning's generic (and per-step costly) walk over the batch when nothing needs moving.
        if all(t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
