"""What a checkpoint records besides Lightning's state, and the check before one is resumed.

Every checkpoint this tool writes holds, under ``RECORD``: the options that decide its results (the
run's or study's identity), the last finished epoch's metrics per member (so that a run stopped
after its last epoch can still report them), and a checksum of its weights, optimizer state and
record. A checkpoint is resumed only when it is whole and was written with the same options.
"""

import hashlib
from pathlib import Path

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from noise_robustness.files import write_atomic
from noise_robustness.study.spec import differences

RECORD = "noise_robustness"  # the checkpoint key of the record
CHECKED = ("state_dict", "optimizer_states", "epoch", "global_step")  # what training continues from


def _feed(digest, value) -> None:
    """Feeds ``value`` (tensors, containers of them, plain values) into ``digest`` in a canonical order."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # its bytes, read where they lie
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())


def checksum(checkpoint: dict) -> str:
    """A digest of what training resumes from and of the record (less its checksum)."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, {key: checkpoint.get(key) for key in CHECKED})
    _feed(digest, {key: value for key, value in checkpoint[RECORD].items() if key != "checksum"})
    return digest.hexdigest()


def checksum_of(value) -> str:
    """A digest of ``value`` (tensors, containers of them, plain values)."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, value)
    return digest.hexdigest()


def record(
    checkpoint: dict, identity: dict, epoch_metrics: dict[str, torch.Tensor], members: list[str], trained_on: list[dict]
) -> None:
    """Adds the record to a checkpoint Lightning is about to save: the options, the last epoch's metrics, the
    names of the members whose state it holds and the machines that trained them (``machine.fingerprint``)."""
    checkpoint[RECORD] = {
        "identity": identity,
        "epoch_metrics": {k: v.detach().cpu() for k, v in epoch_metrics.items()},
        "members": members,
        "trained_on": trained_on,
    }
    checkpoint[RECORD]["checksum"] = checksum(checkpoint)


def checked_load(path: Path, what: str, remedy: str = "") -> object:
    """``torch.load`` of a file this tool wrote (tensors and plain values only), on the CPU.

    Raises:
        ValueError: ``{path} is damaged or not a {what}``, with torch's kind of error and the ``remedy``.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged, truncated or foreign file
        hint = f"; {remedy}" if remedy else ""
        raise ValueError(f"{path} is damaged or not a {what} ({type(err).__name__}){hint}") from None


def check_checkpoint(path: str) -> None:
    """Raises ValueError unless ``path`` (a command's ``ckpt_path``) is a Lightning checkpoint file."""
    if not Path(path).is_file():
        raise ValueError(f"Expected `ckpt_path` to be a checkpoint file (or `last`), but {path} does not exist")
    try:
        checkpoint = checked_load(Path(path), "checkpoint")
    except ValueError as err:
        raise ValueError(f"Expected `ckpt_path` to be a checkpoint file, but {path} is not one: {err}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"Expected `ckpt_path` to be a checkpoint file, but {path} holds no `state_dict`")


def verify(path: Path, identity: dict | None, ignored: set[str], remedy: str, members: list[str] | None = None) -> None:
    """Checks a checkpoint before it is resumed, creating nothing.

    Args:
        path: the checkpoint.
        identity: the options of the run that would resume it (None: check that it is whole only).
        ignored: options that may differ (more epochs, other callbacks).
        remedy: what the user can do instead, for the message.
        members: the names of the members the run would resume (None: not checked). A checkpoint written before
            its record named them is checked by their number (its metrics have one value per member).

    Raises:
        ValueError: naming the file and what is wrong: not a checkpoint, damaged, written by
            another tool, or written with other options (each named with both values).
    """
    checkpoint = checked_load(path, "checkpoint", remedy)
    kept = checkpoint.get(RECORD) if isinstance(checkpoint, dict) else None
    if not isinstance(kept, dict) or "checksum" not in kept:
        raise ValueError(f"{path} holds no record of the options that wrote it, so it cannot be checked; {remedy}")
    if checksum(checkpoint) != kept["checksum"]:
        raise ValueError(
            f"{path} is damaged: its weights or state no longer match the checksum written with them; {remedy}"
        )
    if identity is not None:
        keys = (set(kept["identity"]) | set(identity)) - ignored
        differ = differences(kept["identity"], identity, keys, "now")
        if differ:
            raise ValueError(f"{path} was written by a run with other options ({'; '.join(differ)}); {remedy}")
    if members is not None:
        metrics = next(iter(kept.get("epoch_metrics", {}).values()), None)
        recorded = kept.get("members")
        if recorded is not None and sorted(recorded) != sorted(members):
            raise ValueError(
                f"{path} holds the state of other members ({', '.join(recorded)}) than this command trains "
                f"({', '.join(members)}); {remedy}"
            )
        if recorded is None and metrics is not None and len(metrics) != len(members):  # written before the names
            raise ValueError(
                f"{path} holds the state of {len(metrics)} member(s), not of the {len(members)} this command trains "
                f"({', '.join(members)}); {remedy}"
            )


def save_weights(path: Path, weights: dict[str, torch.Tensor], study_id: str) -> None:
    """Writes one member's final weights (its network's ``state_dict``) atomically, with a checksum and the
    ``study_id`` that trained them: what ``certify`` and ``attack`` evaluate."""
    weights = {name: tensor.detach().cpu().clone() for name, tensor in weights.items()}
    saved = {"weights": weights, "study_id": study_id}
    saved["checksum"] = checksum_of(saved)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: torch.save(saved, file))


class FileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing the checkpoint to its file as ``torch.save`` goes (a temporary file
    beside it, renamed when whole: ``write_atomic``). Lightning's own first builds the whole file in memory: ~92 MB
    each epoch of the main job on top of the training's state, which made the job's peak memory. Anything but a
    local path (a remote file system, storage options) goes Lightning's way."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda file: torch.save(checkpoint, file))


def load_weights(path: Path, study_id: str) -> dict[str, torch.Tensor]:
    """A member's final weights as ``save_weights`` wrote them.

    Raises:
        ValueError: naming the file: missing, damaged, or trained by another study.
    """
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: the study kept no final weights for this member (studies trained before "
            "weights were kept have none); train the study anew in a new --out to evaluate it"
        )
    saved = checked_load(path, "weights file")
    unchecked = {key: value for key, value in saved.items() if key != "checksum"} if isinstance(saved, dict) else None
    if unchecked is None or saved.get("checksum") != checksum_of(unchecked):
        raise ValueError(f"{path} is damaged: its weights no longer match the checksum written with them")
    if saved["study_id"] != study_id:
        raise ValueError(f"{path} was written by another study (study_id {saved['study_id']}, not {study_id})")
    return saved["weights"]
