"""The noise function: exact identities and statistics on real MNIST images."""

import math

import pytest
import torch

from noise_robustness.data import mnist
from noise_robustness.data.noise import BLOCK, add_noise, check_noise_mode, check_noise_scale, standard_normal

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def images(data_dir) -> torch.Tensor:
    """The first 2,000 training images as float32 in [0, 1]."""
    return mnist.load(data_dir, train=True)[0][:2000].float() / 255


def test_zero_noise_is_exactly_the_clean_images(images):
    z = standard_normal(len(images), SHAPE, seed=0, split="train")
    assert torch.equal(add_noise(images, 0.0, z), images)
    assert torch.equal(add_noise(images, 0.0, None, clip=True), images)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0, 4.0, 255 * 0.1])
def test_noise_has_mean_zero_and_std_sigma(images, sigma):
    noise = add_noise(images, sigma, standard_normal(len(images), SHAPE, seed=3, split="train")) - images
    assert abs(noise.std().item() / sigma - 1) < 0.02
    assert abs(noise.mean().item()) < 0.01 * sigma
    # per image too: every image gets noise of the full std, not a shared or scaled-down pattern
    per_image = noise.flatten(1).std(dim=1) / sigma
    assert per_image.min() > 0.85 and per_image.max() < 1.15


def test_noise_is_standard_normal_in_shape():
    z = standard_normal(3000, SHAPE, seed=0, split="train").flatten().double()
    skew = ((z - z.mean()) ** 3).mean() / z.std() ** 3
    kurtosis = ((z - z.mean()) ** 4).mean() / z.std() ** 4
    assert abs(skew) < 0.01 and abs(kurtosis - 3) < 0.02
    within_one_sigma = (z.abs() < 1).double().mean().item()
    assert abs(within_one_sigma - math.erf(1 / math.sqrt(2))) < 0.002


def test_each_image_gets_its_own_draw():
    z = standard_normal(2 * BLOCK + 10, SHAPE, seed=0, split="train").flatten(1)
    corr = torch.corrcoef(z[::97])  # pairs within and across blocks
    off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.2  # 784 pixels: |r| of independent rows stays well below this
    assert len(torch.unique(z[:, 0])) == len(z)


def test_noise_depends_only_on_seed_split_epoch_and_index():
    full = standard_normal(2 * BLOCK + 500, SHAPE, seed=7, split="train")
    again = standard_normal(2 * BLOCK + 500, SHAPE, seed=7, split="train")
    assert torch.equal(full, again)
    for n in (1, 100, BLOCK, BLOCK + 1):  # shorter splits and subsets see the same rows
        assert torch.equal(standard_normal(n, SHAPE, seed=7, split="train"), full[:n])
    for other in (
        standard_normal(len(full), SHAPE, seed=8, split="train"),
        standard_normal(len(full), SHAPE, seed=7, split="test"),
        standard_normal(len(full), SHAPE, seed=7, split="train", epoch=1),
    ):
        assert (other != full).all()


def test_clip_keeps_pixels_in_range(images):
    z = standard_normal(len(images), SHAPE, seed=0, split="train")
    noisy = add_noise(images, 1.0, z, clip=True)
    assert noisy.min() == 0 and noisy.max() == 1
    assert torch.equal(noisy, (images + z).clamp(0, 1))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), -float("inf"), "0.5", None, True])
def test_bad_noise_scale_is_rejected_with_its_name(bad):
    with pytest.raises(ValueError, match=r"Expected `noise_scale` to be a finite number >= 0, but got"):
        check_noise_scale(bad)


def test_noise_mode_is_checked():
    assert check_noise_mode("resample") == "resample"
    with pytest.raises(ValueError, match=r"`noise_mode`.*'fixed', 'resample'.*'gaussian'"):
        check_noise_mode("gaussian")
