"""A dataset other than the shipped MNIST: a torchvision dataset class, or an image folder, read once into tensors.

``--data.dataset torchvision.datasets.CIFAR10`` (or ``{class_path: ..., init_args: {...}}`` for arguments that change
the data, such as EMNIST's ``split``) reads the dataset from ``--data.data_dir`` (torchvision's ``root``),
downloading it only with ``--data.download true``. Its train and test files are made the way the class makes them:
``train=True/False`` (the MNIST family, CIFAR), ``split="train"/"test"`` (SVHN), or, for a class that takes neither
(``torchvision.datasets.ImageFolder``), the ``train/`` and ``test/`` (or ``val/``) subfolders of ``data_dir``; a
folder without them is one training file, validated on a held-out share (``--data.val_holdout``).

Each file becomes ``(images, labels)``: uint8 ``[N, C, H, W]`` and int64 ``[N]``, every image of one size, as the
MNIST files are; the study then runs on them as on MNIST. A SHA-256 of what was read joins the study's identity.
"""

import functools
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import MNIST
from torchvision.transforms import PILToTensor

from noise_robustness.classpaths import class_at

FILES = ("train", "test")
FOLDERS = {"train": ("train",), "test": ("test", "val")}  # an image folder's subfolders of each file


def spec_of(dataset: str | dict) -> dict:
    """``{"class_path": ..., "init_args": {...}}`` of a ``--data.dataset`` given as a class path or as that dict."""
    if isinstance(dataset, str):
        return {"class_path": dataset, "init_args": {}}
    if not isinstance(dataset, dict) or not isinstance(dataset.get("class_path"), str):
        raise ValueError(
            f"Expected `data.dataset` to be a class path or {{class_path, init_args}}, but got {dataset!r}"
        )
    return {"class_path": dataset["class_path"], "init_args": dict(dataset.get("init_args") or {})}


def dataset_class(spec: dict) -> type:
    """The class of ``spec``, checked to be a ``torch.utils.data.Dataset`` that takes its ``init_args`` and a
    ``root`` (the data folder), before any data is read.

    Raises:
        ValueError: naming ``data.dataset``, the value and what is allowed.
    """
    path = spec["class_path"]
    cls = class_at(path, Dataset, "data.dataset", "a dataset class", "torchvision.datasets")
    parameters = inspect.signature(cls.__init__).parameters
    takes = set(parameters) - {"self"}
    files = {"train"} if names_files_by_train(cls) else {"split"}  # (EMNIST's split chooses its data)
    owned = sorted(({"root", "download", "transform", "target_transform"} | files) & set(spec["init_args"]))
    if "root" not in takes or owned:
        raise ValueError(
            f"Expected `data.dataset` ({path}) to take a `root` and init_args other than root, download, train, split "
            f"and transforms (the study sets those: --data.data_dir, --data.download), but got {owned or 'no root'}"
        )
    unknown = sorted(set(spec["init_args"]) - takes)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"Expected `data.dataset` init_args that {path} takes, but it takes no {unknown[0]!r}")
    return cls


def names_files_by_train(cls: type) -> bool:
    """Whether ``cls`` makes its train and test files with ``train=True/False`` (the MNIST family, EMNIST through its
    ``**kwargs``, CIFAR), rather than a ``split`` (SVHN) or folders."""
    return "train" in inspect.signature(cls.__init__).parameters or issubclass(cls, MNIST)


def file_datasets(spec: dict, root: str, download: bool) -> dict[str, Dataset | None]:
    """The dataset's train and test files as the class makes them (None: a folder without a test subfolder)."""
    cls, args = dataset_class(spec), spec["init_args"]
    takes = inspect.signature(cls.__init__).parameters
    extra = {"download": download} if "download" in takes else {}
    try:
        if names_files_by_train(cls):
            return {file: cls(root, train=file == "train", **extra, **args) for file in FILES}
        if "split" in takes:
            return {file: cls(root, split=file, **extra, **args) for file in FILES}
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted", a failed download
        remedy = "" if download else "; --data.download true lets torchvision download it"
        raise ValueError(
            f"Expected `data.dataset` ({spec['class_path']}) in --data.data_dir {root}, but {err}{remedy}"
        ) from None
    folders = {file: [Path(root, name) for name in FOLDERS[file] if Path(root, name).is_dir()] for file in FILES}
    if not folders["train"]:  # one folder: trained on, validated on a held-out share
        return {"train": image_folder(cls, Path(root), args), "test": None}
    return {file: image_folder(cls, found[0], args) if found else None for file, found in folders.items()}


def image_folder(cls: type, folder: Path, args: dict) -> Dataset:
    """``cls(folder)``, its own errors (no class folder, no image) named as ``data.dataset``'s."""
    try:
        return cls(str(folder), **args)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"Expected `data.dataset` to find images in {folder}, but {err}") from None


def tensors(dataset: Dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, C, H, W], labels int64 [N])`` of a dataset: its arrays where it keeps them (MNIST family,
    CIFAR, SVHN), else each item's image as ``PILToTensor`` reads it.

    Raises:
        ValueError: no images, or images of two sizes, naming ``where`` and the sizes.
    """
    data = getattr(dataset, "data", None)
    labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 3 and labels is not None:
        images = data[:, None]
    elif isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and labels is not None:
        images = torch.from_numpy(data)
        images = images if data.shape[1] in (1, 3) else images.permute(0, 3, 1, 2)  # NHWC (CIFAR) -> NCHW
    else:
        dataset.transform, dataset.target_transform = PILToTensor(), None
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise ValueError(f"Expected `data.dataset` to hold images in {where}, but it holds none")
        sizes = {tuple(image.shape) for image, _ in items}
        if len(sizes) > 1:
            shown = ", ".join("x".join(map(str, size)) for size in sorted(sizes)[:3])
            raise ValueError(
                f"Expected every image of `data.dataset` in {where} to be of one size (C x H x W), but found {shown}: "
                "resize them to one size first"
            )
        images, labels = torch.stack([image for image, _ in items]), [label for _, label in items]
    if len(images) == 0:
        raise ValueError(f"Expected `data.dataset` to hold images in {where}, but it holds none")
    return images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _load(spec_json: str, root: str, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    files = file_datasets(json.loads(spec_json), root, download)
    return {file: None if ds is None else tensors(ds, str(getattr(ds, "root", root))) for file, ds in files.items()}


def load(dataset: str | dict, root: str, download: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """The dataset's ``"train"`` and ``"test"`` files as ``(images, labels)`` (``"test"`` None: an image folder without
    a test subfolder), read once per process.

    Raises:
        ValueError: a class that is not a dataset, files that are missing (not downloaded), a folder without images,
            images of two sizes, negative labels, train and test images of different sizes.
    """
    files = _load(json.dumps(spec_of(dataset), sort_keys=True), str(root), bool(download))
    if any(int(y.min()) < 0 for _, y in filter(None, files.values())):
        raise ValueError(
            f"Expected the labels of `data.dataset` to be class indices >= 0, but {root} has negative ones"
        )
    shapes = {tuple(x.shape[1:]) for x, _ in filter(None, files.values())}
    if len(shapes) > 1:
        raise ValueError(f"Expected the train and test images of `data.dataset` to be of one size, but got {shapes}")
    return files


def sha256(files: dict[str, tuple[torch.Tensor, torch.Tensor] | None]) -> str:
    """A SHA-256 of the images and labels read, file by file: what the study trained on, whatever its source."""
    digest = hashlib.sha256()
    for file in FILES:
        for tensor in files.get(file) or ():
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
