"""The LightningModule: K members (one network per (σ, seed)) trained in one step, cross-entropy each."""

from collections.abc import Callable
from copy import deepcopy
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric

from noise_robustness.calibration import MemberCalibration
from noise_robustness.corruptions import Corruption
from noise_robustness.engine import switches
from noise_robustness.engine.graphs import StepGraphs, graphed_step
from noise_robustness.engine.masks import DEFAULT_MASKS
from noise_robustness.models import DropoutMLP, Normalize
from noise_robustness.study.members import study_members

STAGES = ("train", "val", "test")
METRICS = ("acc", "loss")  # logged as "<stage>/<metric>", per member


def member_sums(correct: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``correct`` (bool) and ``losses`` ``[K, B]`` -> per member, the correct predictions and the losses summed
    (``[2, K]``: row 0 the correct, row 1 the losses; float64, exact counts), and the images counted. One stacked
    sum rather than one per row: a step's metrics are a few operations however many members it trains."""
    return torch.stack((correct, losses)).sum(dim=2, dtype=torch.float64), correct.shape[1]


class StepSums:
    """``member_sums`` added up over a graphed epoch's steps in tensors that stay in place (a metric's states are
    replaced when it is reset, and a CUDA graph writes where it was captured), added to the metric at epoch end."""

    def __init__(self):
        self.sums: list[torch.Tensor] = []  # correct and loss [2, K]; images []

    def add(self, sums: torch.Tensor, images: int) -> None:
        if not self.sums:
            self.sums = [torch.zeros_like(sums), sums.new_zeros(())]
        self.sums[0] += sums
        self.sums[1] += images

    def add_to(self, metric: "MemberMeans") -> None:
        """Adds the sums to ``metric`` and zeroes them, in place."""
        if self.sums:
            metric.update(*self.sums)
            for tensor in self.sums:
                tensor.zero_()


class MemberMeans(Metric):
    """Per member, the mean accuracy and loss over the images seen: kept on the device, updated every step
    without reading anything back, summed across DDP processes before dividing, read once an epoch."""

    full_state_update = False

    def __init__(self, members: int):
        super().__init__()
        self.add_state("sums", torch.zeros(len(METRICS), members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: torch.Tensor, images: int | torch.Tensor) -> None:
        """``member_sums`` of some images: per member, correct predictions and losses summed ``[2, K]``, and the
        images."""
        self.sums += sums
        self.count += images

    def compute(self) -> dict[str, torch.Tensor]:
        # float64: an accuracy is a ratio of counts
        return {name: row / self.count for name, row in zip(METRICS, self.sums, strict=True)}


def check_network(network: nn.Module, image_shape: tuple[int, ...], classes: int, data: str) -> None:
    """Raises ValueError, before any training, unless ``network`` maps the data's images (``[B, *image_shape]``) to
    ``classes`` logits: a user's network that does not fails here, named beside the data, not in a step."""
    name = f"{type(network).__module__}.{type(network).__qualname__}"
    shown = f"[B, {', '.join(map(str, image_shape))}]"
    copy = deepcopy(network).eval()  # the member itself stays as it is: its mode, its lazy layers
    images = torch.zeros(2, *image_shape, device=next(copy.parameters(), torch.zeros(())).device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the global generator left as it was
            shape = tuple(copy(images).shape)
    except Exception as err:  # whatever the network raises on input of the wrong shape
        raise ValueError(
            f"Expected `model.net` ({name}) to take {data}'s images, {shown}, but it raised {type(err).__name__}: {err}"
        ) from None
    if shape != (2, classes):
        raise ValueError(
            f"Expected `model.net` ({name}) to map {data}'s images, {shown}, to its {classes} classes' logits, "
            f"[B, {classes}], but it gave {list(shape)} for B = 2"
        )


class NoiseClassifier(pl.LightningModule):
    """Trains one 10-class network per study member, side by side, with RMSprop (Keras defaults).

    Args:
        net: the network, chosen in a config by ``class_path``; built once per member, its initial
            weights drawn from the member's seed (default: the dropout MLP).
        lr: RMSprop learning rate.
        rho: RMSprop decay of the squared-gradient average (PyTorch calls it ``alpha``).
        eps: RMSprop epsilon, added to the root mean square (1e-7 in Keras, 1e-8 in PyTorch).
        fast: the speed engine (``engine/``): the members stacked into one network, their dropout masks drawn
            at once, the multi-tensor RMSprop, bf16 copies of the weights. False: torch's own path, the reference the
            engine is tested against: each member's network as built (``nn.Linear``, ``nn.Dropout``, ...), one after
            another, ``torch.optim.RMSprop`` and Lightning's own precision; the same members, weights and noise.
        dropout_masks: ``counter`` draws every member's dropout masks in one counter-based draw a step, the
            same handful of operations at any number of members (``masks.CounterMasks``); ``per_member``
            draws each member's from a generator of its own, three operations per member and layer (the
            recipe of studies made before ``counter``; other masks, so other numbers).
        compiled: run the step's elementwise passes through ``torch.compile``: the RMSprop update as one
            fused pass instead of five (~3x faster on a CPU; last-bit differences) and the counter masks' hash
            as one pass instead of eight (the same bits); compiled once a process, needs a C++ compiler on a CPU.
        graphed: on a CUDA device, the training step as CUDA graphs (``engine/graphs.py``): forward, loss, backward
            and metrics one graph per batch shape, the RMSprop update another, each replayed in one launch a
            step; the same kernels, so the same numbers. Elsewhere the same step runs eagerly. The training batches
            then come in blocks (``data.steps_per_batch``), so that Lightning's per-batch work is done once a block.
            Needs the fast path, the counter masks, a network that stacks, and one process.
        scales: the study's noise levels σ; set by the study's ``--scales``.
        seeds: the study's seeds; set by the study's ``--seeds``.
        corruptions: what the members train on; set by the study's ``--corruptions``.
        members: the names of the members to train (``sigma=0.5/seed=0``), among every (corruption, severity,
            seed) of the options above; null: all of them. ``sweep`` sets it to the members not finished yet.
        normalize: ``{mean: [...], std: [...]}``, a value per channel: each member's network sees ``(x - mean) / std``
            of its noisy images (the noise stays in [0, 1] pixel units); null: the images as they are.
    """

    def __init__(
        self,
        net: Callable[[], nn.Module] = DropoutMLP,
        lr: float = 1e-3,
        rho: float = 0.9,
        eps: float = 1e-7,
        fast: bool = True,
        dropout_masks: Literal["counter", "per_member"] = DEFAULT_MASKS,
        compiled: bool = False,
        graphed: bool = False,
        scales: list[float] = [0.0],
        seeds: list[int] = [0],
        corruptions: list[Corruption] | None = None,
        members: list[str] | None = None,
        normalize: dict[str, list[float]] | None = None,
    ):
        super().__init__()
        # No save_hyperparameters(): the run's config.yaml is its record, and a checkpoint without
        # hyperparameters is read by LightningCLI's `--ckpt_path` as weights only, never as options.
        switches.check(fast, dropout_masks, compiled, graphed)
        self.lr, self.rho, self.eps, self.fast, self.compiled, self.graphed = lr, rho, eps, fast, compiled, graphed
        self.members = study_members(scales, seeds, corruptions, members)
        self.normalize = Normalize(**normalize) if normalize else nn.Identity()
        self.net = switches.members_net(net, [m.seed for m in self.members], fast, dropout_masks, compiled, graphed)
        self.automatic_optimization = not graphed  # graphed: the step's backward pass is inside its graph
        self.step_sums = StepSums()  # the graphed step's metrics
        self.step_graphs: StepGraphs | None = None  # made when fitting starts
        # One metric per stage, so their states never mix; updated every step, logged per epoch.
        self.metrics = nn.ModuleDict({f"{stage}_metrics": MemberMeans(len(self.members)) for stage in STAGES})
        self.epoch_metrics: dict[str, torch.Tensor] = {}  # "<stage>/<metric>" -> [K] (float64), the last epoch's
        # the test passes' (the robustness pass's) calibration, per member: ``calibration.calibration_sums``
        self.calibration = MemberCalibration(len(self.members))
        self.test_calibration: torch.Tensor | None = None  # the last test pass's sums, [3, K, bins + 1]
        self.backward_seed: torch.Tensor | None = None  # d loss / d loss = 1, kept from step to step (backward)

    def check_data(self, image_shape: tuple[int, ...], classes: int, data: str) -> None:
        """Raises ValueError, before any training, unless the network takes the ``data``'s images and gives its
        ``classes``' logits (``check_network``), and a normalisation has a value per channel."""
        check_network(self.net.member(0), image_shape, classes, data)
        if isinstance(self.normalize, Normalize) and len(self.normalize.mean) != image_shape[0]:
            raise ValueError(
                f"Expected `model.normalize` to give a mean and std for each of the {image_shape[0]} channel(s) of "
                f"{data}'s images, but it gives {len(self.normalize.mean)}"
            )

    def on_fit_start(self) -> None:
        if self.graphed:
            if self.trainer.world_size > 1:
                raise ValueError("`graphed` runs in one process (DDP reduces gradients outside the step's graph)")
            optimizer = self.trainer.optimizers[0]
            copies = self.net.bf16_copies
            self.step_graphs = StepGraphs(
                self.forward_backward,
                lambda: [*self.parameters(), *(copies.copies if copies is not None else [])],
                optimizer.zero_grad,
            )
        if self.net.bf16_copies is not None:  # else autocast's own casts
            trainer = self.trainer
            self.net.bf16_copies.enabled = switches.bf16_copies_serve(
                self.net, trainer.optimizers, trainer.gradient_clip_val, trainer.accumulate_grad_batches
            )

    def on_train_epoch_start(self) -> None:
        # Dropout streams are reseeded per (member seed, epoch, rank): an epoch draws the same masks
        # whether or not the run was interrupted and resumed before it.
        self.net.start_epoch(self.current_epoch, self.global_rank)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[K, B, C, H, W]`` images -> ``[K, B, classes]`` logits, member k on its own images."""
        return self.net(self.normalize(images))

    def member_losses(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The summed loss of the members on one batch (each member's gradient is its own loss's), and its
        ``member_sums``."""
        return self.logit_losses(self(images), labels)

    def logit_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``member_losses`` of the members' ``logits``."""
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        return losses.mean(dim=1).sum(), member_sums(logits.detach().argmax(-1) == labels, losses.detach())

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """The summed loss of the members on one batch; its metrics added to the stage's."""
        loss, sums = self.member_losses(*batch)
        self.metrics[f"{stage}_metrics"].update(*sums)
        return loss

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """What ``step_graphs`` captures: the forward and backward pass, the metrics into ``step_sums``."""
        loss, sums = self.member_losses(images, labels)
        self.step_sums.add(*sums)
        loss.backward()

    def end_epoch(self, stage: str) -> None:
        """Reduces the epoch's metrics (across DDP processes too), keeps them per member, resets them."""
        means = self.metrics[f"{stage}_metrics"].compute()
        self.metrics[f"{stage}_metrics"].reset()
        for name in METRICS:
            values = means[name].reshape(len(self.members))  # torchmetrics squeezes a single member's
            self.epoch_metrics[f"{stage}/{name}"] = values
            # the mean over members, for the progress bar and callbacks; each member's goes to its own run
            # sync_dist: the values are the same on every process already (the metric summed them); Lightning asks
            self.log(
                f"{stage}/{name}", values.float().mean(), logger=False, prog_bar=name == "acc" and stage != "test",
                sync_dist=True,
            )  # fmt: skip

    def on_train_epoch_end(self) -> None:
        self.step_sums.add_to(self.metrics["train_metrics"])
        self.end_epoch("train")
        step = self.current_epoch + 1
        for logger in self.loggers:
            if hasattr(logger, "log_members"):  # a run per member (RunLogger, a study's MemberRuns)
                logger.log_members(self.epoch_metrics, self.members, step=step)
            elif self.trainer.is_global_zero:  # a user's logger in a `fit`: one run, each member's metrics named
                names = [f"/{m.name}" if len(self.members) > 1 else "" for m in self.members]
                metrics = {
                    f"{tag}{name}": float(v[k]) for tag, v in self.epoch_metrics.items() for k, name in enumerate(names)
                }
                logger.log_metrics(metrics, step=step)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.end_epoch("val")
        else:
            self.metrics["val_metrics"].reset()

    def on_test_epoch_end(self) -> None:
        self.end_epoch("test")
        self.test_calibration = self.calibration.compute().reshape(-1, len(self.members), self.calibration.bins + 1)
        self.calibration.reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not self.graphed:
            return self.model_step(batch, "train")
        images, labels = batch
        if labels.dim() == 2:  # one batch, not a block of them (``data.MemberBatches``)
            images, labels = images[:, None], labels[:, None]
        optimizer = self.optimizers()  # Lightning's, so that its step count and hooks see every step
        for step in range(labels.shape[1]):
            graphed_step(self.net, self.step_graphs, images[:, step], labels[:, step])
            optimizer.step()
        return None

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Lightning's backward pass, seeded with a 1 kept from step to step: ``loss.backward()`` would make one
        every step (an operation, a launch on a GPU). The same gradients."""
        if not args and "gradient" not in kwargs:
            seed = self.backward_seed
            if seed is None or seed.device != loss.device or seed.dtype != loss.dtype:
                self.backward_seed = seed = torch.ones_like(loss)
            kwargs["gradient"] = seed
        super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """``model_step``'s metrics, and each member's calibration (the robustness pass's ECE)."""
        images, labels = batch
        logits = self(images)
        self.metrics["test_metrics"].update(*self.logit_losses(logits, labels)[1])
        self.calibration.update(logits, labels)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """``[K, B]`` predicted digits."""
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return switches.optimizer(
            self.parameters(), self.net, self.fast, self.lr, self.rho, self.eps, self.compiled, self.graphed
        )
