"""The corruptions on real MNIST images and on colour 3 x 32 x 32 images made from them, each against an independent
reference: scipy's filters, warps and distributions, numpy draws of scikit-image's and MNIST-C's definitions
(statistics over many images, not pixels), matplotlib's HSV for a colour image's brightness."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colors
from scipy import ndimage, stats

from noise_robustness.cli import cli_main
from noise_robustness.corruptions import (
    BUILT_IN,
    GAUSSIAN,
    Brightness,
    Contrast,
    GaussianBlur,
    ImpulseNoise,
    Rotate,
    Scale,
    Shear,
    ShotNoise,
    SpeckleNoise,
    Stripe,
    Translate,
    UniformNoise,
    build,
    poisson_quantile,
)
from noise_robustness.data import mnist
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.data.noise import BLOCK, draw
from noise_robustness.study.folder import RESULT_COLUMNS, ROBUSTNESS_COLUMNS
from noise_robustness.study.members import Member, evaluations, study_members
from tests.conftest import exits_with_error, rows, tiny

SHAPE = (1, 28, 28)


def colour(grey: torch.Tensor) -> torch.Tensor:
    """``[n, 1, 28, 28]`` digits -> ``[n, 3, 32, 32]`` colour images: padded by 2, three channels that differ (the
    digit, the digit mirrored, a dimmed negative) on a grey background."""
    x = torch.nn.functional.pad(grey, (2, 2, 2, 2), value=0.0)
    return torch.cat([x, x.flip(-1) * 0.7 + 0.1, (1 - x) * 0.6], dim=1)


@pytest.fixture(scope="module", params=["mnist", pytest.param("colour", marks=pytest.mark.slow)])  # colour: CI
def images(data_dir, request) -> torch.Tensor:
    """The first 2,000 test images as float32 in [0, 1], as one member's batch ``[1, n, C, H, W]``: MNIST's, and
    colour 3 x 32 x 32 images made from them."""
    grey = mnist.load(data_dir, train=False)[0][:2000].float() / 255
    return (grey if request.param == "mnist" else colour(grey[:1000]))[None]


@pytest.fixture(scope="module")
def uniform(images) -> torch.Tensor:
    return draw("uniform", images.shape[1], tuple(images.shape[2:]), seed=1, split="test")[None]


@pytest.fixture(scope="module")
def normal(images) -> torch.Tensor:
    return draw("normal", images.shape[1], tuple(images.shape[2:]), seed=1, split="test")[None]


def planes(x: torch.Tensor) -> np.ndarray:
    """A member's batch ``[1, n, C, H, W]`` as its ``n * C`` planes ``[n * C, H, W]`` (float64), image by image."""
    return x[0].flatten(0, 1).double().numpy()


def at(severity: float) -> torch.Tensor:
    return torch.tensor(float(severity)).view(1, 1, 1, 1, 1)


def test_the_uniform_pattern_is_uniform_and_blockwise_like_the_normal_one():
    u = draw("uniform", 2 * BLOCK + 10, SHAPE, seed=0, split="train")
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.flatten()[:200_000].double().numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(draw("uniform", BLOCK + 3, SHAPE, seed=0, split="train"), u[: BLOCK + 3])  # a subset: same rows
    z = draw("normal", 2 * BLOCK + 10, SHAPE, seed=0, split="train")
    assert abs(np.corrcoef(u.flatten().numpy(), z.flatten().numpy())[0, 1]) < 0.01  # streams of their own


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_gaussian_noise_is_normal_with_sigma_as_its_std_in_every_channel(images, normal, sigma):
    noise = GAUSSIAN(images, at(sigma), normal=normal) - images  # σ in [0, 1] pixel units, a draw per channel
    for channel in noise[0].transpose(0, 1):
        assert stats.kstest(channel.flatten()[:200_000].double().numpy(), stats.norm(0, sigma).cdf).pvalue > 1e-3


@pytest.mark.parametrize("severity", [0.1, 0.5, 2.0])
def test_uniform_noise_is_uniform_with_the_severity_as_its_std(images, uniform, severity):
    noise = (UniformNoise()(images, at(severity), uniform=uniform) - images).flatten().double()
    half_width = math.sqrt(3) * severity
    assert stats.kstest(noise.numpy(), stats.uniform(-half_width, 2 * half_width).cdf).pvalue > 1e-3
    assert abs(noise.std().item() / severity - 1) < 0.01


@pytest.mark.parametrize("amount", [0.03, 0.27, 1.0])
def test_impulse_noise_replaces_pixels_as_scikit_images_salt_and_pepper_does(images, uniform, amount):
    out = ImpulseNoise()(images, at(amount), uniform=uniform).numpy().ravel()
    # skimage.util.random_noise(mode="s&p", amount=a): each pixel flipped with probability a, then salt (1) or
    # pepper (0) with probability 1/2 each; drawn here with numpy
    x = images.numpy().ravel()
    rng = np.random.default_rng(0)
    flipped, salted = rng.random(x.shape) < amount, rng.random(x.shape) < 0.5
    reference = np.where(flipped & salted, 1.0, np.where(flipped & ~salted, 0.0, x))
    n = x.size
    for changed_to in (1.0, 0.0):  # the share of pixels that became white (black) and were not, in both
        ours, theirs = (
            ((out == changed_to) & (x != changed_to)).mean(),
            ((reference == changed_to) & (x != changed_to)).mean(),
        )
        pooled = (ours + theirs) / 2
        assert abs(ours - theirs) < 5 * math.sqrt(2 * pooled * (1 - pooled) / n) + 1e-12
    assert np.array_equal(out[~((out == 0) | (out == 1))], x[~((out == 0) | (out == 1))])  # the rest untouched


def test_the_poisson_quantile_is_scipys_exactly():
    generator = torch.Generator().manual_seed(0)
    rate = torch.rand(200_000, dtype=torch.float64, generator=generator) * 300
    rate[:50_000] *= 0.01  # dim pixels: few photons
    u = torch.rand(200_000, generator=generator)
    expected = stats.poisson.ppf(u.double().numpy(), rate.numpy())
    assert np.array_equal(poisson_quantile(rate, u).numpy(), expected)


@pytest.mark.parametrize("severity", [0.13, 0.3, 0.58])
def test_shot_noise_is_numpys_poisson_photon_count(images, uniform, severity):
    photons = 1 / severity**2
    out = ShotNoise()(images, at(severity), uniform=uniform).double().numpy().ravel()
    x = images.double().numpy().ravel()
    reference = np.random.default_rng(0).poisson(x * photons) / photons  # MNIST-C's shot_noise, unclipped
    grey = np.round(x * 255)
    for level in (255, 128):  # the counts of pixels of one intensity: one distribution, two draws
        ours, theirs = np.round(out[grey == level] * photons), np.round(reference[grey == level] * photons)
        top = int(max(ours.max(), theirs.max())) + 1
        table = np.array([np.bincount(ours.astype(int), minlength=top), np.bincount(theirs.astype(int), minlength=top)])
        table = table[:, table.sum(0) >= 10]  # chi-square wants filled cells
        assert stats.chi2_contingency(table).pvalue > 1e-3
        assert abs(ours.mean() / (level / 255 * photons) - 1) < 0.05
    assert np.array_equal(out[x == 0], x[x == 0])  # no photons from black


@pytest.mark.parametrize("severity", [0.15, 0.6])
def test_speckle_noise_is_multiplicative_gaussian(images, normal, severity):
    out = SpeckleNoise()(images, at(severity), normal=normal).double().numpy().ravel()
    x = images.double().numpy().ravel()
    lit = x > 0.5
    relative = (out[lit] - x[lit]) / x[lit]  # skimage's speckle: x + x n, n ~ N(0, σ²)
    assert stats.kstest(relative, stats.norm(0, severity).cdf).pvalue > 1e-3
    assert np.array_equal(out[x == 0], x[x == 0])


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 3.0, 6.0])
def test_gaussian_blur_is_scipys_gaussian_filter(images, sigma):
    out = planes(GaussianBlur()(images[:, :200], at(sigma)))
    for image, blurred in zip(planes(images[:, :200]), out):
        expected = ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=4.0)
        assert np.abs(blurred - expected).max() < 1e-5


def skimage_warp(image: np.ndarray, matrix: np.ndarray, shift=(0.0, 0.0)) -> np.ndarray:
    """MNIST-C's ``transform.warp(x, inverse_map=aff)`` about the centre ((13.5, 13.5) on MNIST), bilinear, zeros
    outside, by scipy: output (x, y) shows the input at ``matrix @ ((x, y) - c) + c + shift`` (x the column, y the
    row)."""
    in_rows = np.array([[matrix[1, 1], matrix[1, 0]], [matrix[0, 1], matrix[0, 0]]])  # (row, column) order
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - in_rows @ centre + np.array([shift[1], shift[0]])
    return ndimage.affine_transform(image, in_rows, offset=offset, order=1, mode="grid-constant", cval=0.0)


def mnist_c_matrix(name: str, severity: float, sign_x: int, sign_y: int):
    """MNIST-C's ``AffineTransform`` of each corruption (skimage of its time: shear A = [[1, −sin a], [0, cos a]])."""
    a = severity * sign_x
    if name == "rotate":
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]), (0, 0)
    if name == "shear":
        return np.array([[1, -math.sin(a)], [0, math.cos(a)]]), (0, 0)
    if name == "scale":
        return np.eye(2) / (1 - severity), (0, 0)
    return np.eye(2), (severity * sign_x, severity * sign_y)  # translate


@pytest.mark.parametrize(
    ("corruption", "severity"), [(Rotate(), 0.2), (Rotate(), 1.0), (Shear(), 0.6), (Scale(), 0.5), (Translate(), 3.0)]
)
def test_affine_corruptions_are_mnist_c_warps(images, uniform, corruption, severity):
    n = 300
    out = planes(corruption(images[:, :n], at(severity), uniform=uniform[:, :n]))
    signs = np.where(uniform[0, :n, 0, 0, :2].numpy() < 0.5, -1, 1)  # one direction per image, every channel
    for image, warped, (sign_x, sign_y) in zip(planes(images[:, :n]), out, signs.repeat(images.shape[2], axis=0)):
        matrix, shift = mnist_c_matrix(corruption.name, severity, sign_x, sign_y)
        assert np.abs(warped - skimage_warp(image, matrix, shift)).max() < 1e-5
    if corruption.name != "scale":  # a random direction per image: each about half the time
        assert abs((signs[:, 0] > 0).mean() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_brightness_contrast_and_stripe_are_mnist_cs_formulas(images):
    x, width = planes(images[:, :500]), images.shape[-1]
    bright = Brightness()(images[:, :500], at(0.3))
    if images.shape[2] == 1:
        assert np.abs(planes(bright) - np.clip(x + 0.3, 0, 1)).max() < 1e-6  # HSV value + c of a grey image
    else:  # MNIST-C's (and ImageNet-C's) brightness: to HSV, value + c clipped, back to RGB (matplotlib's)
        rgb = images[0, :500].permute(0, 2, 3, 1).double().numpy()
        hsv = colors.rgb_to_hsv(rgb)
        hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
        assert np.abs(bright[0].permute(0, 2, 3, 1).double().numpy() - colors.hsv_to_rgb(hsv)).max() < 1e-5
    contrast = planes(Contrast()(images[:, :500], at(0.8)))
    means = x.mean(axis=(1, 2), keepdims=True)  # each channel's, as ImageNet-C's contrast
    assert np.abs(contrast - np.clip((x - means) * 0.2 + means, 0, 1)).max() < 1e-6
    stripe = planes(Stripe()(images[:, :500], at(7)))
    expected = x.copy()
    expected[:, :, :7], expected[:, :, width - 7 :] = 1 - x[:, :, :7], 1 - x[:, :, width - 7 :]
    assert np.abs(stripe - expected).max() < 1e-6


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_severity_zero_is_the_clean_image_and_the_clean_member(images, uniform, normal, name):
    corruption = build(BUILT_IN[name].__name__)  # by class name, as a config names it
    out = corruption(images[:, :50], at(0), normal=normal[:, :50], uniform=uniform[:, :50])
    assert (out - images[:, :50]).abs().max() < 1e-5  # identity up to rounding (a warp samples at computed points)
    # and exactly: severity 0 of any corruption is the clean member, whose images are the clean ones
    assert Member(0.0, 3, corruption) == Member(0.0, 3) and Member(0.0, 3, corruption).name == "sigma=0/seed=3"


def test_a_members_corrupted_images_are_the_same_in_any_batch_subset_or_company(data_dir):
    corruptions = [ImpulseNoise(), ShotNoise(), Rotate(), GaussianBlur(), GAUSSIAN]
    dm = NoisyMNISTDataModule(scales=[0.3], seeds=[0, 1], corruptions=corruptions, data_dir=data_dir)
    dm.setup("fit")
    first = torch.arange(64)
    together, labels = dm.noisy_images("val", {0: first, 1: first})
    for k, member in enumerate(dm.members):
        alone, _ = dm.noisy_images("val", {member.seed: torch.tensor([37, 5, 60])}, [member])
        assert torch.equal(alone[0], together[k, [37, 5, 60]]), member.name  # subset, order, company
    assert not torch.equal(together[0], together[5])  # seeds 0 and 1 draw their own patterns
    # training images in resample mode: a fresh draw per epoch; fixed mode: the same every epoch
    for mode, same in (("resample", False), ("fixed", True)):
        dm = NoisyMNISTDataModule(
            scales=[0.3], seeds=[0], corruptions=[ImpulseNoise()], noise_mode=mode, data_dir=data_dir
        )
        dm.setup("fit")
        epoch0, _ = dm.noisy_images("train", {0: first}, epoch=0)
        epoch1, _ = dm.noisy_images("train", {0: first}, epoch=1)
        assert torch.equal(epoch0, epoch1) == same


def test_members_and_evaluation_cells_of_a_corruption_study():
    members = study_members(
        [0.0, 0.3], [0], [GAUSSIAN, {"class_path": "ImpulseNoise", "init_args": {"severities": [0.1]}}]
    )
    assert [m.name for m in members] == ["sigma=0/seed=0", "sigma=0.3/seed=0", "impulse=0.1/seed=0"]
    cells = evaluations([{"class_path": "Rotate", "init_args": {"severities": [0.2, 1]}}], [0.0], members)
    assert [(c.name, s) for c, s in cells] == [("gaussian", 0.0), ("rotate", 0.2), ("rotate", 1.0)]
    assert [(c.name, s) for c, s in evaluations(None, [], members)] == [
        ("gaussian", 0),
        ("gaussian", 0.3),
        ("impulse", 0.1),
    ]


# -- a corruption study through the real command line --------------------------------------------------------------

TRAIN = "[GaussianNoise, {class_path: ImpulseNoise, init_args: {severities: [0.2]}}]"
EVAL = (
    "[{class_path: ShotNoise, init_args: {severities: [0.2, 0.5]}}, "
    "{class_path: Rotate, init_args: {severities: [0.5, 1.0]}}, {class_path: Stripe, init_args: {severities: [5]}}]"
)


@pytest.fixture(scope="module")
def corruption_study(data_dir, tmp_path_factory) -> Path:
    """A finished tiny study: clean, Gaussian σ = 1 and impulse 0.2, 2 seeds, evaluated on shot, rotate and stripe
    (on 2,000 held-out validation images: each of its 6 evaluation cells is a pass over them)."""
    out = tmp_path_factory.mktemp("corruptions") / "study"
    options = [f"--corruptions={TRAIN}", f"--eval_corruptions={EVAL}", "--data.val_holdout=2000"]
    cli_main(tiny(data_dir, out, *options, seeds="[0, 1]", batches=3))
    return out


def test_a_corruption_study_records_each_members_corruption_and_every_evaluation_cell(corruption_study):
    results = rows(corruption_study / "results.csv")
    assert results[0]["_columns"] == RESULT_COLUMNS
    assert [(r["corruption"], float(r["noise_scale"]), int(r["seed"])) for r in results] == [
        (c, s, seed) for seed in (0, 1) for c, s in (("gaussian", 0.0), ("gaussian", 1.0), ("impulse", 0.2))
    ]
    assert (corruption_study / "members" / "impulse=0.2" / "seed=1.json").is_file()
    cells = rows(corruption_study / "robustness.csv")
    assert cells[0]["_columns"] == ROBUSTNESS_COLUMNS
    evaluated = [("gaussian", 0.0), ("shot", 0.2), ("shot", 0.5), ("rotate", 0.5), ("rotate", 1.0), ("stripe", 5.0)]
    assert len(cells) == len(results) * len(evaluated)
    for result in results:  # the clean cell is the member's validation accuracy
        mine = [
            r
            for r in cells
            if (r["train_corruption"], r["train_noise_scale"], r["seed"])
            == (result["corruption"], result["noise_scale"], result["seed"])
        ]
        assert [(r["eval_corruption"], float(r["eval_noise_scale"])) for r in mine] == evaluated
    for name in ("robustness", "corruption_preview", "noise_preview", "corruption_errors"):
        assert (corruption_study / f"{name}.png").stat().st_size > 10_000
    assert (corruption_study / "tensorboard" / "impulse=0.2" / "seed=1").is_dir()  # a TensorBoard run per member


def test_the_summary_numbers_are_recomputed_from_robustness_csv(corruption_study):
    cells = rows(corruption_study / "robustness.csv")
    acc = {
        (
            int(r["seed"]),
            r["train_corruption"],
            float(r["train_noise_scale"]),
            r["eval_corruption"],
            float(r["eval_noise_scale"]),
        ): float(r["acc"])
        for r in cells
    }

    def auc(seed, train, corruption, levels):  # trapezoids by hand: mean accuracy over [0, top]
        a = [acc[(seed, *train, "gaussian", 0.0)]] + [acc[(seed, *train, corruption, s)] for s in levels]
        x = [0.0, *levels]
        return sum((x[i + 1] - x[i]) * (a[i] + a[i + 1]) / 2 for i in range(len(levels))) / levels[-1]

    def ce(seed, train, corruption, levels):  # ImageNet-C: summed errors over the clean-trained member's
        return sum(1 - acc[(seed, *train, corruption, s)] for s in levels) / sum(
            1 - acc[(seed, "gaussian", 0.0, corruption, s)] for s in levels
        )

    levels = {"shot": [0.2, 0.5], "rotate": [0.5, 1.0], "stripe": [5.0]}
    impulse = ("impulse", 0.2)
    per_seed_auc = [[auc(seed, impulse, c, v) for c, v in levels.items()] for seed in (0, 1)]
    per_seed_ce = [[ce(seed, impulse, c, v) for c, v in levels.items()] for seed in (0, 1)]

    def text(values):
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"

    summary = (corruption_study / "summary.md").read_text()
    auc_line, ce_line = [line for line in summary.splitlines() if line.startswith("| impulse 0.2 |")][-2:]
    clean = text([acc[(seed, *impulse, "gaussian", 0.0)] for seed in (0, 1)])
    expected_auc = (
        [clean] + [text([s[i] for s in per_seed_auc]) for i in range(3)] + [text([np.mean(s) for s in per_seed_auc])]
    )
    expected_ce = [text([s[i] for s in per_seed_ce]) for i in range(3)] + [text([np.mean(s) for s in per_seed_ce])]
    assert auc_line == f"| impulse 0.2 | {' | '.join(expected_auc)} |"
    assert ce_line == f"| impulse 0.2 | {' | '.join(expected_ce)} |"
    assert "| clean | 100.00 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 |" in summary  # the baseline
    assert "| trained on | clean | shot (0.2, 0.5) | rotate (0.5, 1) | stripe (5) | mean |" in summary


@pytest.mark.slow
def test_the_gaussian_study_named_explicitly_is_the_default_study_bit_for_bit(data_dir, tmp_path):
    default, explicit = tmp_path / "default", tmp_path / "explicit"
    cli_main(tiny(data_dir, default, batches=2))
    cli_main(tiny(data_dir, explicit, "--corruptions=[GaussianNoise]", "--eval_corruptions=null", batches=2))
    for name in ("results.csv", "robustness.csv", "summary.md", "study.yaml"):
        assert (default / name).read_bytes() == (explicit / name).read_bytes(), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corruptions=[Fog]"], "Expected corruptions to be among GaussianNoise, UniformNoise"),
        (["--eval_corruptions=[impulse]"], "but got 'impulse' (in `eval_corruptions`)"),
        (["--corruptions=[ImpulseNoise]", "--scales=[0, 2]"], "severities of `impulse` to be numbers in [0, 1]"),
        (["--corruptions=[{class_path: Rotate, init_args: {severities: [4]}}]"], "in [0, 3.14159"),
        (["--eval_corruptions=[{class_path: Stripe, init_args: {severities: [2.5]}}]"], "whole numbers in [0, 14]"),
        (["--eval_corruptions=[ShotNoise, Rotate, ShotNoise]"], "`eval_corruptions` to name each corruption once"),
        (["--corruptions=[{class_path: ShotNoise, init_args: {severities: [0.1, 0.1]}}]"], "hold each value once"),
    ],
)
def test_a_bad_corruption_is_one_message_naming_it_before_anything_is_made(args, message, data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    error = exits_with_error(tiny(data_dir, out, *args), capsys)
    assert message in error and error.count("error:") == 1
    assert not out.exists()


def test_the_evaluation_list_is_part_of_a_studys_identity(corruption_study, data_dir, capsys):
    other = "--eval_corruptions=[{class_path: ShotNoise, init_args: {severities: [0.2]}}]"
    message = exits_with_error(
        tiny(data_dir, corruption_study, f"--corruptions={TRAIN}", other, "--data.val_holdout=2000", seeds="[0, 1]"),
        capsys,
    )
    assert "holds a study made with other options (eval_corruptions:" in message


def test_certify_smooths_the_members_trained_on_gaussian_noise_only(corruption_study):
    from noise_robustness.certify.certification import Setting, plan

    (certification,) = plan([str(corruption_study)], Setting(n0=10, n=100, alpha=0.001, images=10, sigma=None))
    assert [m.name for m in certification.members] == ["sigma=1/seed=0", "sigma=1/seed=1"]  # not impulse, not clean
    (named,) = plan([str(corruption_study)], Setting(n0=10, n=100, alpha=0.001, images=10, sigma=0.5))
    assert [m.name for m in named.members] == ["sigma=0/seed=0", "sigma=1/seed=0", "sigma=0/seed=1", "sigma=1/seed=1"]
