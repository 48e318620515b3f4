"""The TensorBoard logger of a run: its own ``version_<n>`` folder, and one TensorBoard run per member."""

from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.files import check_writable
from noise_robustness.study.members import Member, hparams_of, run_names

FINAL_METRICS = ("val/acc", "train/acc", "val/loss", "train/loss")  # the HParams table's metric columns


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


def member_run(log_dir: Path, member: Member, members: list[Member]) -> Path:
    """The folder of ``member``'s TensorBoard run: ``<log_dir>/sigma=0.5/seed=0``, or ``log_dir`` itself for a
    study of one member."""
    return log_dir / run_names(members)[members.index(member)] if len(members) > 1 else log_dir


class RunLogger(TensorBoardLogger):
    """TensorBoardLogger that claims each new ``version_<n>`` atomically and gives every member its own run.

    Member (σ = 0.5, seed 0) of a study writes to ``<log_dir>/sigma=0.5/seed=0/`` (a study of one
    member writes to ``<log_dir>`` itself), so TensorBoard overlays the members per tag.
    """

    def __init__(
        self, save_dir: str = "tb_logs", name: str | None = "lightning_logs", version: int | str | None = None, **kwargs
    ):
        check_writable(save_dir, "trainer.logger.init_args.save_dir")
        super().__init__(save_dir, name, version, **kwargs)
        self.claimed_version = version  # None until the run's folder is claimed
        self._member_writers: dict[str, SummaryWriter] = {}

    @property
    def version(self) -> int | str:
        """The run's ``version_<n>``, claimed atomically when first asked for (never at construction, which
        may still end in a bad-input error); other DDP ranks write nothing and take Lightning's default."""
        if self.claimed_version is None and rank_zero_only.rank == 0:
            self.claimed_version = claim_run_folder(self.root_dir)
        return self.claimed_version if self.claimed_version is not None else super().version

    def member_writer(self, member: Member, members: list[Member]) -> SummaryWriter:
        """The SummaryWriter of ``member``'s run."""
        if member.name not in self._member_writers:
            self._member_writers[member.name] = SummaryWriter(str(member_run(Path(self.log_dir), member, members)))
        return self._member_writers[member.name]

    @rank_zero_only
    def log_members(self, metrics: dict[str, torch.Tensor], members: list[Member], step: int) -> None:
        """Writes ``metrics`` (tag -> one value per member) into each member's run at ``step`` (the epoch)."""
        for k, member in enumerate(members):
            writer = self.member_writer(member, members)
            for tag, values in metrics.items():
                writer.add_scalar(tag, float(values[k]), step)
            writer.flush()

    @rank_zero_only
    def log_member_image(self, member: Member, members: list[Member], tag: str, image: torch.Tensor) -> None:
        """``image`` ``[C, H, W]`` in ``member``'s run."""
        self.member_writer(member, members).add_image(tag, image, global_step=0)

    @rank_zero_only
    def log_member_hparams(self, members: list[Member], constants: dict[str, object]) -> None:
        """The HParams view: σ (or corruption and severity) and seed first, then the study's other settings, against
        the final metrics.

        An experiment summary at the root lists the columns in that order (with every value, so
        TensorBoard knows σ and seed differ); each member's run holds its own values. Its metric
        columns show the last value of each member's ``train/*`` and ``val/*`` curves.
        """
        # TensorBoard shows numbers with five digits ("128.00"): integers go as text, to read as such.
        shown = {name: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for name, v in constants.items()}
        values = {m: {**apart, "seed": str(m.seed), **shown} for m, apart in hparams_of(members).items()}
        columns = {name: sorted({v[name] for v in values.values()}) for name in values[members[0]]}
        # `differs`: TensorBoard lists the columns that differ first (and shows only the first few by default).
        infos = [hparam_info(name, column) for name, column in columns.items()]
        metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in FINAL_METRICS]
        root = SummaryWriter(self.log_dir)
        root.file_writer.add_summary(experiment_summary(infos, metrics))
        root.close()
        # Each row of the HParams table is named after its member's run (its "trial ID"), in the runs' order.
        for member, name in zip(members, run_names(members)):
            writer = self.member_writer(member, members)
            writer.file_writer.add_summary(hp.hparams_pb(values[member], trial_id=name))
            writer.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        for writer in self._member_writers.values():
            writer.close()
        self._member_writers.clear()
        super().finalize(status)


def hparam_info(name: str, values: list) -> api_pb2.HParamInfo:
    """An HParams column: its name, type and values, and whether they differ between runs."""
    info = api_pb2.HParamInfo(name=name, differs=len(values) > 1)
    hp.Discrete(values).update_hparam_info(info)  # the type and the values, as `hp.HParam` writes them
    return info


def experiment_summary(infos: list[api_pb2.HParamInfo], metrics: list[api_pb2.MetricInfo]) -> Summary:
    """The HParams experiment of a study: its columns and metrics, as ``hp.hparams_config_pb`` writes them,
    with ``differs`` set (which that function cannot)."""
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    summary = Summary()
    data = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment))
    summary.value.add(tag=metadata.EXPERIMENT_TAG, metadata=data, tensor=metadata.NULL_TENSOR)
    return summary


def last_checkpoint(save_dir: str, name: str) -> str:
    """The newest ``<save_dir>/<name>/version_<n>/checkpoints/last.ckpt``: what ``--ckpt_path last`` resumes."""
    found = [folder / "checkpoints" / "last.ckpt" for _, folder in sorted(run_folders(Path(save_dir, name)).items())]
    found = [path for path in found if path.is_file()]
    if not found:
        raise ValueError(
            "Expected a checkpoint to resume with `--ckpt_path last`, but found no "
            f"{Path(save_dir, name, 'version_*/checkpoints/last.ckpt')}"
        )
    return str(found[-1])
