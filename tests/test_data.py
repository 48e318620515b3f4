"""The DataModule and its loaders on real MNIST: sharding, per-image noise, splits, data files."""

import gzip
import hashlib
import shutil
import subprocess
import sys

import pytest
import torch

from noise_robustness import mnist
from noise_robustness.data import NoisyMNISTDataModule, TensorBatches, shard_batches
from noise_robustness.noise import add_noise, standard_normal


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
    if batch_size == 1 and n % world_size:  # equal batch counts are impossible: a clear error
        with pytest.raises(ValueError, match="batch_size of at least 2"):
            [shard_batches(order, rank, world_size, batch_size) for rank in range(world_size)]
        return
    per_rank = [shard_batches(order, rank, world_size, batch_size) for rank in range(world_size)]
    seen = torch.cat([torch.cat(batches) for batches in per_rank])
    assert len(seen) == n and torch.equal(seen.sort().values, torch.arange(n))
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(0 < len(b) <= batch_size for batches in per_rank for b in batches)
    if world_size == 1:  # one process: plain chunks, the last one partial, in order
        assert [len(b) for b in per_rank[0]] == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        assert torch.equal(seen, order)


def test_loader_serves_indexed_rows_of_the_whole_tensors(data_dir):
    dm = ready(data_dir, noise_scale=0.5, batch_size=1000)
    loader = TensorBatches(dm.train_images, dm.split_labels("train"), 1000, lambda: (3, 0, 1), shuffle_seed=0)
    idx = torch.cat(loader.batches())
    images, labels = map(torch.cat, zip(*loader))
    assert len(loader) == 60 and len(labels) == 60000
    assert torch.equal(images, dm.train_images(3)[idx]) and torch.equal(labels, dm.split_labels("train")[idx])
    assert not torch.equal(idx, torch.arange(60000))  # shuffled ...
    assert torch.equal(idx, torch.cat(loader.batches()))  # ... the same way for the same epoch


def test_noise_of_an_image_is_independent_of_batching_split_and_instance(data_dir):
    a = ready(data_dir, noise_scale=1.0, batch_size=32)
    b = ready(data_dir, noise_scale=1.0, batch_size=1000, val_holdout=5000)
    held_out = b.splits["val"][1]
    assert torch.equal(a.train_images(0)[held_out], b.eval_images["val"])
    kept = b.splits["train"][1]
    assert torch.equal(a.train_images(0)[kept], b.train_images(0))
    assert torch.equal(a.eval_images["val"], b.eval_images["test"])


@pytest.mark.parametrize(("sigma", "clip", "holdout"), [(0.5, False, 0), (2.0, True, 0), (1.0, False, 5000)])
def test_the_datamodule_serves_exactly_the_pure_noise_function(data_dir, sigma, clip, holdout):
    dm = ready(data_dir, noise_scale=sigma, clip=clip, val_holdout=holdout, noise_seed=4)
    images = mnist.load(data_dir, train=True)[0].float() / 255
    expected = add_noise(images, sigma, standard_normal(60000, (1, 28, 28), seed=4, split="train"), clip)
    assert torch.equal(dm.train_images(0), expected[dm.splits["train"][1]])


def noisy_digest(data_dir: str, noise_mode: str, epoch: int) -> str:
    dm = ready(data_dir, noise_scale=0.5, noise_mode=noise_mode)
    return hashlib.sha256(dm.train_images(epoch).numpy().tobytes()).hexdigest()


def test_noise_is_identical_across_processes(data_dir):
    code = f"from tests.test_data import noisy_digest; print(noisy_digest({data_dir!r}, 'resample', 2))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == noisy_digest(data_dir, "resample", 2)


def test_fixed_noise_stays_and_resampled_noise_changes_per_epoch(data_dir):
    fixed = ready(data_dir, noise_scale=0.5)
    assert torch.equal(fixed.train_images(0), fixed.train_images(5))
    resample = ready(data_dir, noise_scale=0.5, noise_mode="resample")
    first = resample.train_images(0).clone()
    assert torch.equal(first, fixed.train_images(0))
    assert not torch.isclose(resample.train_images(1), first).all(dim=(1, 2, 3)).any()
    assert torch.equal(resample.eval_images["val"], fixed.eval_images["val"])  # validation stays fixed


def test_splits_and_clean_pixels(data_dir):
    dm = ready(data_dir, noise_scale=0.0)
    assert torch.equal(dm.train_images(0), dm.clean("train"))
    assert dm.clean("train").min() == 0 and dm.clean("train").max() == 1
    assert len(dm.eval_images["val"]) == 10000  # the MNIST test split, as the original study
    assert torch.bincount(dm.split_labels("val")).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    held = ready(data_dir, val_holdout=5000)
    train, val = held.splits["train"][1], held.splits["val"][1]
    assert len(train) == 55000 and len(val) == 5000 and not set(train.tolist()) & set(val.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_scale": -1.0}, "`noise_scale`"),
        ({"noise_scale": float("nan")}, "`noise_scale`"),
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
    assert dm.images["train"].shape == (60000, 1, 28, 28)
