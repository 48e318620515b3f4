"""The TensorBoard logger of a run: its own ``version_<n>`` folder, never shared, never overwritten."""

import os
from pathlib import Path

from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only


def run_folders(root: str | Path) -> dict[int, Path]:
    """The ``<root>/version_<n>`` folders by ``n``."""
    return {int(p.name[8:]): p for p in Path(root).glob("version_*") if p.name[8:].isdigit()}


def claim_run_folder(root: str | Path) -> int:
    """Creates the next free ``<root>/version_<n>`` and returns ``n``.

    ``mkdir`` either creates the folder or fails, so two runs started at once never share one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = max(run_folders(root), default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def check_writable(folder: str | Path, argument: str) -> None:
    """Raises ValueError unless ``folder`` exists as a writable folder or could be created, creating nothing."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Expected `{argument}` to be a folder this user can write, but {existing} is not")


class RunLogger(TensorBoardLogger):
    """TensorBoardLogger that checks its folder up front and claims each new ``version_<n>`` atomically."""

    def __init__(self, save_dir: str = "tb_logs", name: str | None = "lightning_logs", **kwargs):
        check_writable(save_dir, "trainer.logger.init_args.save_dir")
        super().__init__(save_dir, name, **kwargs)

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # other DDP ranks write nothing; Lightning hands them rank zero's folder
            return super()._get_next_version()
        return claim_run_folder(self.root_dir)
