"""What the evaluations of a finished study share (``certify``, ``attack``): the study and its members' final
weights, its own data read again (checked to be what it trained on), the evaluated images, the members side by side,
and the evaluation's folder, named after its setting, recorded and locked.

An evaluation lives in ``<study>/<command>/<setting>/``; its record file holds the setting and the ``study_id`` of
the weights evaluated, so that another setting or another study's weights never mix with it.
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pytorch_lightning.cli import instantiate_class

from noise_robustness.data import datasets
from noise_robustness.data.datamodule import N_TEST, NoisyMNISTDataModule
from noise_robustness.data.noise import seeded
from noise_robustness.engine.stacked import stack
from noise_robustness.files import DamagedFile, Lock, check_writable, read_record, remove_interrupted_writes
from noise_robustness.models import Normalize
from noise_robustness.study.folder import Study, StudyError
from noise_robustness.study.members import Member
from noise_robustness.training.checkpoints import load_weights

SUBSET_SEED = 0  # the evaluated images: the first `images` of one seeded order of the validation split


def finished_studies(folders: list[str], images: int) -> list[Study]:
    """The finished study in each of ``folders`` (``finished_study``), each named once."""
    if len(set(folders)) != len(folders):
        raise ValueError(f"Expected `out` to name each study once, but got {folders}")
    return [finished_study(folder, images) for folder in folders]


def finished_study(folder: str, images: int) -> Study:
    """The finished study in ``folder``, whose validation split holds ``images`` (MNIST's is checked here; another
    dataset's when it is read).

    Raises:
        ValueError: naming ``out``, or ``images``, and what is wrong.
    """
    try:
        study = Study.open(Path(folder))
        study.finished_runs()
    except ValueError as err:  # no study, or members without results (StudyIncomplete)
        raise ValueError(f"Expected `out` to name finished studies, but {err}") from None
    data = study.resolved.get("data", {})
    split = data.get("val_holdout", 0) or N_TEST
    if data.get("dataset") is None and images > split:
        raise ValueError(f"Expected `images` to be at most the {split} validation images of {folder}, but got {images}")
    return study


def member_weights(study: Study, members: list[Member]) -> list[dict[str, torch.Tensor]]:
    """Each member's final weights, checked to be this study's."""
    return [load_weights(study.weights_file(m), study.study_id) for m in members]


def check_folder(folder: Path, record_file: str, record: dict) -> None:
    """Raises ValueError unless ``folder`` can be written and holds no other evaluation than ``record``, whole (a
    damaged record is refused: the rows beside it may be of other weights)."""
    check_writable(folder, "out")
    recorded = folder / record_file
    try:
        if read_record(recorded, record) != record:
            raise ValueError(f"{recorded} records another evaluation; move {folder} away to evaluate with this setting")
    except FileNotFoundError:
        return
    except DamagedFile as err:
        raise ValueError(f"{err}; move {folder} away to evaluate anew") from None


def network_factory(spec: dict):
    """The network a study recorded (``model.net``: ``class_path`` and ``init_args``), as a factory."""
    return functools.partial(
        instantiate_class, (), {"class_path": spec["class_path"], "init_args": spec.get("init_args") or {}}
    )


def member_networks(study: Study, weights: list[dict]) -> list[torch.nn.Module]:
    """The study's network once per state of ``weights``, with it, in eval mode."""
    factory = network_factory(study.resolved["model"]["net"])
    nets = []
    for state in weights:
        net = factory()
        net.load_state_dict(state)
        nets.append(net.eval())
    return nets


def members_net(study: Study, members: list[Member], weights: list[dict], device: torch.device) -> torch.nn.Module:
    """The ``members`` side by side with their ``weights``, in eval mode on ``device``: ``[K, B, C, H, W]`` images in
    [0, 1] -> ``[K, B, classes]`` logits, normalised as in training."""
    net = stack(member_networks(study, weights), [m.seed for m in members])
    normalize = study.resolved["model"].get("normalize")  # the members' input, as in training
    net = torch.nn.Sequential(Normalize(**normalize), net) if normalize else net
    return net.to(device).eval()


def study_data(study: Study, data_dir: str, images: int) -> NoisyMNISTDataModule:
    """The study's own data, read from ``data_dir``, set up.

    Raises:
        StudyError: the data cannot be read there, is not what the study trained on (``data.sha256``), or its
            validation split has fewer than ``images``.
    """
    data = study.resolved.get("data", {})
    datamodule = NoisyMNISTDataModule(
        data_dir=data_dir, val_holdout=data.get("val_holdout", 0), dataset=data.get("dataset"),
        batch_size=data.get("batch_size", 128),
    )  # fmt: skip
    try:
        datamodule.prepare_data()
    except ValueError as err:  # the study's dataset is not in this --data.data_dir (any more)
        raise StudyError(f"Cannot read the data of {study.out}: {err}") from None
    datamodule.setup()
    if data.get("dataset") is not None:  # the files read now are the ones the study trained on
        if datasets.sha256(datamodule.files()) != study.identity.get("data.sha256"):
            raise StudyError(f"The data in {data_dir} is not the data {study.out} was trained on (its data.sha256)")
        if images > datamodule.split_size("val"):
            raise StudyError(
                f"Expected `images` to be at most the {datamodule.split_size('val')} validation images of "
                f"{study.out}, but got {images}"
            )
    return datamodule


def subset(split_size: int, images: int) -> list[int]:
    """The evaluated validation positions: the first ``images`` of a fixed seeded order (more images extend it;
    ``certify`` and ``attack`` evaluate the same images)."""
    order = seeded(torch.randperm, split_size, "certify", SUBSET_SEED)
    return order[:images].tolist()


def subset_images(datamodule: NoisyMNISTDataModule, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images at ``positions`` in [0, 1] (``[n, C, H, W]``, float32) and their labels ``[n]``."""
    file, indices = datamodule.splits["val"]
    chosen = indices[torch.tensor(positions, dtype=torch.long)]
    return datamodule.images[file][chosen].float().div_(255), datamodule.file_labels[file][chosen].long()


@contextmanager
def locked(folder: Path, command: str) -> Iterator[None]:
    """Holds ``folder``'s lock while the body evaluates into it.

    Raises:
        StudyError: another command holds it.
    """
    lock = Lock(folder / "lock")
    if not lock.held:
        raise StudyError(f"Another command is {command} {folder}; let it finish (rerun this one afterwards)")
    remove_interrupted_writes(folder)
    try:
        yield
    finally:
        lock.release()
