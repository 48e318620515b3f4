"""The DataModule and its loaders on real MNIST: sharding, per-image noise, splits, data files."""

import gzip
import hashlib
import shutil
import subprocess
import sys

import pytest
import torch

from noise_robustness.data import mnist
from noise_robustness.data.batches import shard_batches
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.data.noise import add_noise, standard_normal


def ready(data_dir, **kwargs) -> NoisyMNISTDataModule:
    dm = NoisyMNISTDataModule(data_dir=data_dir, **kwargs)
    dm.setup("fit")
    return dm


SHARDINGS = [
    (n, world_size, batch_size)
    for n in (1, 127, 128, 129, 1000, 1001, 60000)
    for world_size in (1, 2, 3, 8)
    for batch_size in (1, 64, 128, 500)
    if n >= world_size  # at least one image per process
]


@pytest.mark.parametrize(("n", "world_size", "batch_size"), SHARDINGS)
def test_shards_cover_the_split_once_in_equal_batch_counts(n, world_size, batch_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    if min(batch_size, n % batch_size or batch_size) < world_size:  # a process would get no image: a clear error
        with pytest.raises(ValueError, match="to give each of"):
            [shard_batches(order, rank, world_size, batch_size) for rank in range(world_size)]
        return
    per_rank = [shard_batches(order, rank, world_size, batch_size) for rank in range(world_size)]
    seen = torch.cat([torch.cat(batches) for batches in per_rank])
    assert len(seen) == n and torch.equal(seen.sort().values, torch.arange(n))
    assert len({len(batches) for batches in per_rank}) == 1
    for step, batch in enumerate(order.split(batch_size)):  # one process's batches, each shared out in order
        shares = [batches[step] for batches in per_rank]
        assert torch.equal(torch.cat(shares), batch) and max(map(len, shares)) - min(map(len, shares)) <= 1


def all_positions(dm, split: str) -> dict[int, torch.Tensor]:
    return {seed: torch.arange(dm.split_size(split)) for seed in dm.hparams.seeds}


def sample(n: int, size: int = 2000) -> torch.Tensor:
    """``size`` positions of a split of ``n`` images, spread over all of it (the same every run)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))[:size].sort().values


def sampled_positions(dm, split: str) -> dict[int, torch.Tensor]:
    """``all_positions``' sample: the same 2,000 positions of the split for every seed."""
    return dict.fromkeys(dm.hparams.seeds, sample(dm.split_size(split)))


def test_loader_serves_each_member_its_own_composed_rows(data_dir):
    dm = ready(data_dir, scales=[0.0, 0.5], seeds=[0, 1], batch_size=1000)
    loader = dm.loader("train", shuffle=True)
    by_seed = loader.batches(3, 0, 1)
    assert len(loader) == 60 and all(len(batches) == 60 for batches in by_seed.values())
    for seed, batches in by_seed.items():  # each seed's batches cover the split once
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(60000)), seed
    full, full_labels = dm.noisy_images("train", all_positions(dm, "train"))
    for i in (0, 1, 59):  # the first batches and the last: composing all 60 again took most of this test's time
        images, labels = dm.noisy_images("train", {s: b[i] for s, b in by_seed.items()}, epoch=3)
        assert images.shape == (4, 1000, 1, 28, 28) and labels.shape == (4, 1000)
        for k, member in enumerate(dm.members):  # member k's batch is rows of its own noisy split
            rows = by_seed[member.seed][i]
            assert torch.equal(images[k], full[k][rows]) and torch.equal(labels[k], full_labels[k][rows])
    assert not torch.equal(torch.cat(by_seed[0]), torch.cat(by_seed[1]))  # each seed shuffles its own way
    assert all(torch.equal(a, b) for a, b in zip(by_seed[0], loader.batches(3, 0, 1)[0]))  # the same way per epoch
    assert not torch.equal(torch.cat(by_seed[0]), torch.arange(60000))


def test_noise_of_an_image_is_independent_of_batching_split_and_study(data_dir):
    a = ready(data_dir, scales=[1.0], batch_size=32)
    b = ready(data_dir, scales=[0.0, 1.0], seeds=[5, 0], batch_size=1000, val_holdout=5000)

    def noisy(dm, split, positions):  # the images of every member at the same split positions
        return dm.noisy_images(split, dict.fromkeys(dm.hparams.seeds, positions))[0]

    for split in ("val", "train"):  # b's held-out and kept images are a's training images at their file rows
        positions = sample(b.split_size(split))
        rows = b.splits[split][1][positions]
        assert torch.equal(noisy(a, "train", rows)[0], noisy(b, split, positions)[3]), split  # member (1.0, seed 0)
    positions = sample(b.split_size("test"))
    assert torch.equal(noisy(a, "val", positions), noisy(b, "test", positions)[3:])


@pytest.mark.parametrize(("sigma", "clip", "holdout"), [(0.5, False, 0), (2.0, True, 0), (1.0, False, 5000)])
def test_the_datamodule_serves_exactly_the_pure_noise_function(data_dir, sigma, clip, holdout):
    dm = ready(data_dir, scales=[sigma], seeds=[4], clip=clip, val_holdout=holdout)
    images = mnist.load(data_dir, train=True)[0].float() / 255
    expected = add_noise(images, sigma, standard_normal(60000, (1, 28, 28), seed=4, split="train"), clip)
    assert torch.equal(dm.noisy_images("train", all_positions(dm, "train"))[0][0], expected[dm.splits["train"][1]])


def noisy_digest(data_dir: str, noise_mode: str, epoch: int) -> str:
    dm = ready(data_dir, scales=[0.5], noise_mode=noise_mode)
    images = dm.noisy_images("train", all_positions(dm, "train"), epoch=epoch)[0]
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_noise_is_identical_across_processes(data_dir):
    code = f"from tests.test_data import noisy_digest; print(noisy_digest({data_dir!r}, 'resample', 2))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == noisy_digest(data_dir, "resample", 2)


def test_fixed_noise_stays_and_resampled_noise_changes_per_epoch(data_dir):
    def train(dm, epoch):
        return dm.noisy_images("train", sampled_positions(dm, "train"), epoch=epoch)[0][0]

    fixed = ready(data_dir, scales=[0.5])
    assert torch.equal(train(fixed, 0), train(fixed, 5))
    resample = ready(data_dir, scales=[0.5], noise_mode="resample")
    first = train(resample, 0).clone()
    assert torch.equal(first, train(fixed, 0))
    assert not torch.isclose(train(resample, 1), first).all(dim=(1, 2, 3)).any()
    val = sampled_positions(fixed, "val")
    assert torch.equal(resample.noisy_images("val", val, epoch=3)[0], fixed.noisy_images("val", val)[0])  # stays fixed


def test_splits_and_clean_pixels(data_dir):
    dm = ready(data_dir)
    clean = dm.noisy_images("train", all_positions(dm, "train"))[0][0]
    assert torch.equal(clean, mnist.load(data_dir, train=True)[0].float() / 255)
    assert clean.min() == 0 and clean.max() == 1
    assert dm.split_size("val") == 10000  # the MNIST test split, as the original study
    assert torch.bincount(dm.labels("val")).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    held = ready(data_dir, val_holdout=5000)
    train, val = held.splits["train"][1], held.splits["val"][1]
    assert len(train) == 55000 and len(val) == 5000 and not set(train.tolist()) & set(val.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": [0.0, -1.0]}, "Expected `scales` to be a finite number >= 0, but got -1.0"),
        ({"scales": [float("nan")]}, "`scales`"),
        ({"scales": []}, "Expected `scales` to be a non-empty list"),
        ({"seeds": [1, 1]}, "Expected `seeds` to hold each value once"),
        ({"seeds": [-1]}, "Expected `seeds` to be integers >= 0"),
        ({"noise_mode": "sometimes"}, "`noise_mode`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"val_holdout": 60000}, "`val_holdout`"),
    ],
)
def test_bad_arguments_fail_before_any_data_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoisyMNISTDataModule(data_dir="/nonexistent", **kwargs)


def test_missing_files_are_unpacked_and_corrupt_ones_named(tmp_path):
    raw = mnist.prepare(tmp_path) / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist.RAW_FILES)
    with gzip.open(mnist.ASSETS / "t10k-labels-idx1-ubyte.gz") as f:
        assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == f.read()
    victim = raw / "t10k-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with pytest.raises(mnist.DataFileError, match=r"t10k-images-idx3-ubyte is corrupt or truncated.*delete it"):
        mnist.prepare(tmp_path)
    victim.unlink()  # deleting it, as the message says, mends it
    mnist.prepare(tmp_path)


def test_unwritable_data_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(mnist.DataFileError, match="is `data_dir` writable"):
        mnist.prepare(blocker / "data")


def test_a_users_own_mnist_copy_is_used(tmp_path, data_dir):
    shutil.copytree(f"{data_dir}/MNIST", tmp_path / "MNIST")
    dm = ready(str(tmp_path))
    assert (
        dm.images["train"].shape == (60000, 1, 28, 28) and dm.images["train"].dtype == torch.uint8
    )  # kept once, as bytes
