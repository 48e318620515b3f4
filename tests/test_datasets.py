"""Datasets other than the shipped MNIST, from files the tests write in the real formats: the MNIST family's IDX files
in torchvision's layout, and CIFAR-10-shaped image folders of PNGs; a user's networks from a temporary module."""

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from noise_robustness.cli import cli_main
from noise_robustness.data import datasets, mnist
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from tests.conftest import events, exits_with_error, member_rows, rows, tiny
from tests.datasets import colour, image_folder, mnist_family

USER_NETWORKS = (Path(__file__).parent / "user_networks.py").read_text()
FOLDER = "torchvision.datasets.ImageFolder"


@pytest.fixture(scope="module")
def fashion(data_dir, tmp_path_factory) -> Path:
    return mnist_family(tmp_path_factory.mktemp("fashion"), "FashionMNIST", data_dir)


@pytest.fixture(scope="module")
def pictures(data_dir, tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pictures"), data_dir)


@pytest.fixture
def user_networks(tmp_path_factory, monkeypatch) -> None:
    folder = tmp_path_factory.mktemp("colournets")
    (folder / "colournets.py").write_text(USER_NETWORKS)
    monkeypatch.syspath_prepend(str(folder))


def study(data_root, out: Path, dataset: str, *args: str, scales: str = "[0, 0.5]") -> list[str]:
    """A real sweep of one epoch on ``dataset`` read from ``data_root`` (every batch: the files are small)."""
    command = tiny(str(data_root), out, f"--data.dataset={dataset}", *args, scales=scales, batches=None)
    return command


@pytest.mark.parametrize("family", ["FashionMNIST", "KMNIST"])
def test_a_dataset_of_the_mnist_family_is_read_from_its_idx_files_as_torchvision_lays_them_out(
    family, data_dir, tmp_path
):
    root = mnist_family(tmp_path, family, data_dir, train=500, test=100)
    data = NoisyMNISTDataModule(data_dir=str(root), dataset=f"torchvision.datasets.{family}", batch_size=64)
    data.prepare_data()
    data.setup()
    (images, labels), (test, _) = data.files()["train"], data.files()["test"]
    assert images.dtype == torch.uint8 and images.shape == (500, 1, 28, 28) and test.shape == (100, 1, 28, 28)
    digits, digit_labels = mnist.load(data_dir, train=True)
    assert torch.equal(images, digits[:500]) and torch.equal(labels, digit_labels[:500])  # what the files hold
    assert (data.image_shape, data.classes, data.split_size("val")) == ((1, 28, 28), 10, 100)


def test_an_image_folder_is_read_as_uint8_colour_images_with_its_classes(pictures, data_dir):
    data = NoisyMNISTDataModule(data_dir=str(pictures), dataset=FOLDER)
    images, labels = data.files()["train"]
    digits, digit_labels = mnist.load(data_dir, train=True)
    order = torch.argsort(digit_labels[:600], stable=True)  # ImageFolder lists class by class, file by file
    assert torch.equal(images, colour(digits[:600][order])) and torch.equal(labels, digit_labels[:600][order])
    assert (data.image_shape, data.classes) == ((3, 32, 32), 10)


@pytest.mark.slow
def test_a_fashion_mnist_study_records_its_data_and_refuses_other_files(fashion, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(study(fashion, out, "torchvision.datasets.FashionMNIST"))
    recorded = yaml.safe_load((out / "study.yaml").read_text())
    assert recorded["data.dataset"] == "torchvision.datasets.FashionMNIST" and len(recorded["data.sha256"]) == 64
    assert len(member_rows(out)) == 2 and (out / "robustness.png").is_file()
    assert "val/samples_clean_above_noisy" in events(out / "tensorboard" / "sigma=0.5" / "seed=0").Tags()["images"]
    # the same options on other files are another study: named, nothing trained
    other = mnist_family(tmp_path / "other", "FashionMNIST", str(fashion.parent / "data"), train=900)
    message = exits_with_error(study(other, out, "torchvision.datasets.FashionMNIST"), capsys)
    assert "data.sha256" in message, message


@pytest.mark.slow
def test_a_colour_study_of_user_networks_trains_resumes_compares_and_certifies(pictures, user_networks, tmp_path):
    looped, stacked = tmp_path / "resnet", tmp_path / "lenet"
    normalize = "--model.normalize={mean: [0.3, 0.3, 0.4], std: [0.3, 0.3, 0.2]}"  # certify normalises as training did
    cli_main(study(pictures, looped, FOLDER, "--model.net=colournets.SmallResNet", normalize))
    extended = study(pictures, looped, FOLDER, "--model.net=colournets.SmallResNet", normalize, scales="[0, 0.5, 1.0]")
    cli_main(extended)
    assert set(member_rows(looped)) == {(0.0, 0), (0.5, 0), (1.0, 0)}
    cli_main(study(pictures, stacked, FOLDER, "--model.net=colournets.LeNet", normalize, f"--compare=[{looped}]"))
    summary = (stacked / "summary.md").read_text()
    assert "SmallResNet" in summary and "LeNet" in summary
    with Image.open(stacked / "noise_preview.png") as preview:
        assert preview.mode in ("RGB", "RGBA")
    cli_main(["certify", f"--out={stacked}", "--n0=20", "--n=100", "--images=10", f"--data.data_dir={pictures}"])
    (certified,) = stacked.glob("certify/*/members/sigma=0.5/seed=0.csv")
    assert len(rows(certified)) == 10


@pytest.mark.parametrize(
    "make, dataset, message",
    [
        (None, "torchvision.datasets.NoSuchSet", "Expected `data.dataset` to be a dataset class, but"),
        (
            None,
            "torch.nn.Linear",
            "to be a dataset class (a torch.utils.data.dataset.Dataset), but got torch.nn.Linear",
        ),
        ("empty", FOLDER, "Expected `data.dataset` to find images in"),
        ("mixed", FOLDER, "to be of one size (C x H x W), but found 3x30x30, 3x32x32"),
        ("no test", FOLDER, "Expected `val_holdout` to be above 0 for a dataset without a test file"),
        (
            None,
            "torchvision.datasets.FashionMNIST",
            "but Dataset not found. You can use download=True to download it; --data.download true lets",
        ),
    ],
)
def test_bad_data_is_one_message_and_nothing_is_made(make, dataset, message, data_dir, tmp_path, capsys):
    root = tmp_path / "data"
    if make == "empty":
        (root / "train" / "class_0").mkdir(parents=True)
    elif make in ("mixed", "no test"):
        image_folder(root, data_dir, train=20, test=0, subfolders=make == "mixed")
    if make == "mixed":
        Image.new("RGB", (30, 30)).save(root / "train" / "class_0" / "odd.png")
    out = tmp_path / "study"
    error = exits_with_error(study(root, out, dataset), capsys)
    assert message in error, error
    assert not out.exists()


def test_a_normalisation_of_other_channels_than_the_datas_is_named(pictures, user_networks, tmp_path, capsys):
    out = tmp_path / "study"
    normalize = "--model.normalize={mean: [0.5], std: [0.25]}"
    error = exits_with_error(study(pictures, out, FOLDER, "--model.net=colournets.LeNet", normalize), capsys)
    assert "Expected `model.normalize` to give a mean and std for each of the 3 channel(s) of ImageFolder's" in error
    assert not out.exists()


def test_a_network_that_does_not_take_the_datas_images_is_named_beside_them(pictures, tmp_path, capsys):
    out = tmp_path / "study"
    error = exits_with_error(study(pictures, out, FOLDER), capsys)  # the MNIST MLP on colour images
    assert (
        "Expected `model.net` (noise_robustness.models.DropoutMLP) to take ImageFolder's images, [B, 3, 32, 32]"
        in error
    )
    assert not out.exists()


def test_an_argument_that_chooses_the_data_is_taken_and_one_the_study_sets_is_refused():
    emnist = {"class_path": "torchvision.datasets.EMNIST", "init_args": {"split": "digits"}}
    assert datasets.dataset_class(datasets.spec_of(emnist)).__name__ == "EMNIST"  # its files are train=True/False
    svhn = {"class_path": "torchvision.datasets.SVHN", "init_args": {"split": "extra"}}  # its files are its splits
    with pytest.raises(ValueError, match=r"the study sets those.*but got \['split'\]"):
        datasets.dataset_class(datasets.spec_of(svhn))


@pytest.mark.parametrize(
    "cls, layout",
    [("CIFAR10", "NHWC"), ("CIFAR100", "NHWC"), ("SVHN", "NCHW")],  # as torchvision keeps each in memory
)
def test_the_arrays_torchvision_keeps_become_nchw_uint8_tensors(cls, layout):
    """CIFAR's and SVHN's files carry checksums that synthetic files cannot match, so their datasets are made here
    without their constructor, holding the arrays their constructors leave (``data`` and ``targets`` or ``labels``)."""
    import numpy as np
    import torchvision

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    dataset = object.__new__(getattr(torchvision.datasets, cls))
    dataset.data = images.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else images
    setattr(dataset, "labels" if cls == "SVHN" else "targets", [1, 2, 3, 4, 0])
    tensors, labels = datasets.tensors(dataset, cls)
    assert tensors.dtype == torch.uint8 and torch.equal(tensors, torch.from_numpy(images))
    assert labels.tolist() == [1, 2, 3, 4, 0]


@pytest.mark.slow
def test_a_folder_of_three_classes_without_a_test_folder_is_studied_on_a_held_out_share(
    data_dir, user_networks, tmp_path
):
    root = tmp_path / "three"
    for label in range(3):  # three classes, one folder: validated on held-out images
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        digits, labels = mnist.load(data_dir, train=True)
        for i, image in enumerate(colour(digits[labels == label][:60])):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    out = tmp_path / "study"
    cli_main(study(root, out, FOLDER, "--model.net=colournets.LeNet", "--model.net.classes=3", "--data.val_holdout=30"))
    assert len(member_rows(out)) == 2 and (out / "noise_preview.png").is_file()
    cli_main(["certify", f"--out={out}", "--n0=20", "--n=100", "--images=5", f"--data.data_dir={root}"])
    assert not (root / "MNIST").exists()  # certify reads the study's data, nothing else, from data_dir
