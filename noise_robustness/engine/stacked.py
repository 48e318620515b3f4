"""K networks as one: parameters stacked along a leading member axis, one random stream per member.

Member ``k`` computes exactly what its network would compute alone: its weights are built from its
own seed, and its dropout masks depend on its own seed only, never on K or its position among the
members. Stacking changes only the floating-point summation order of the matrix products.

Two sources of dropout masks (``masks``):
- ``per_member``: each member draws from its own generator, reseeded from (seed, epoch, rank) when an
  epoch starts: three operations per member and dropout layer a step;
- ``counter``: every member's and layer's masks in one draw a step, from a counter-based hash of
  (member seed, epoch, rank, step) and the unit's index (``CounterMasks``): the same operations at any K,
  and the same bits on any device.

Dropout masks come from 16 random bits per unit (4 units per 64-bit draw, ~7x cheaper than ``bernoulli_`` on a
CPU) or the counter-based draw, and ReLU and dropout are one multiplication by a saved mask. The reference these
are tested against is torch's own path: each member's network as built, one after another (``MemberLoop``, what
``NoiseClassifier(fast=False)`` trains with ``torch.optim.RMSprop``).

Under bf16 autocast the engine also keeps bf16 copies of the weights that the optimizer step writes
(``Bf16Copies``), instead of autocast casting every weight to bf16 and every gradient back to fp32 each step:
the same numbers, bit for bit.
"""

import copy
import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from noise_robustness.data.noise import derive_seed
from noise_robustness.engine.bf16 import Bf16Copies
from noise_robustness.engine.layers import SUPPORTED, plan_steps, stackable  # noqa: F401 (SUPPORTED: the engine's list)
from noise_robustness.engine.masks import DEFAULT_MASKS, MASKS, CounterMasks, MemberGenerators, ReluDropout, keep_mask

BATCH_STATS = ("running_mean", "running_var", "batches")  # a stacked batch norm's buffers, ``<kind>_<i>``


def build_member(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with its initial weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("init", seed))
        return factory()


class StackedSequential(nn.Module):
    """K copies of one ``nn.Sequential`` of the layers ``layers.SUPPORTED`` lists, run as one.

    Dense layers are batched matrix products over ``[K, B, features]``; convolutions are grouped
    convolutions over ``[B, K * channels, H, W]`` (group k = member k; on a CPU a few members at a time,
    ``member_groups``); a batch norm is one batch norm over the K members' channels (each member's statistics its
    own), a layer norm one over each member's features with the member's own scale and shift. Input ``[K, B, ...]``,
    output ``[K, B, classes]``. With norms the weights stay fp32 under autocast (no bf16 copies).
    """

    cpu_conv_group: int | None = 3  # members a conv network runs at once on a CPU (None: all; see member_groups)

    def __init__(
        self,
        members: list[nn.Sequential],
        seeds: list[int],
        masks: str = DEFAULT_MASKS,
        compiled: bool = False,
        bf16_copies: bool = True,
    ):
        super().__init__()
        if masks not in MASKS:
            raise ValueError(f"Expected `masks` to be one of {MASKS}, but got {masks!r}")
        self.k, self.masks = len(members), masks
        self.template = [copy.deepcopy(members[0])]  # in a list: a pattern for `member()`, not a submodule
        self.plan = plan_steps(list(members[0]))
        self.generators, self.counter = MemberGenerators(seeds), CounterMasks(seeds, compiled)
        self.step, self.rank = 0, 0  # training steps this epoch (the counter masks' step); this DDP process
        self._dropout_layers: dict[tuple[int, ...], tuple[tuple[int, float], ...]] = {}  # image shape -> (units, p)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.norm_weights, self.norm_biases = nn.ParameterList(), nn.ParameterList()  # [K * C] batch, [K, 1, F] layer
        for layers in zip(*members):
            if isinstance(layers[0], nn.Linear):  # [K, in, out]: x @ W, no transpose per step
                self.weights.append(torch.stack([layer.weight.detach().t() for layer in layers]))
                self.biases.append(torch.stack([layer.bias.detach()[None] for layer in layers]))
            elif isinstance(layers[0], nn.Conv2d):  # [K * out, in, kh, kw]: group k is member k
                # channels-last: oneDNN's grouped convolutions run ~1.5x faster so on a CPU
                self.weights.append(
                    torch.cat([layer.weight.detach() for layer in layers]).contiguous(memory_format=torch.channels_last)
                )
                self.biases.append(torch.cat([layer.bias.detach() for layer in layers]))
            elif isinstance(layers[0], (nn.BatchNorm1d, nn.BatchNorm2d)):
                i = len(self.norm_weights)
                self.norm_weights.append(torch.cat([layer.weight.detach() for layer in layers]))
                self.norm_biases.append(torch.cat([layer.bias.detach() for layer in layers]))
                means, variances = (torch.cat([getattr(layer, name) for layer in layers]) for name in BATCH_STATS[:2])
                for kind, stat in zip(BATCH_STATS, (means, variances, layers[0].num_batches_tracked.clone())):
                    self.register_buffer(f"{kind}_{i}", stat)
            elif isinstance(layers[0], nn.LayerNorm):
                self.norm_weights.append(torch.stack([layer.weight.detach()[None] for layer in layers]))
                self.norm_biases.append(torch.stack([layer.bias.detach()[None] for layer in layers]))
        # under bf16 autocast: weights as [*weights, *biases] in bf16, written by the optimizer
        copies = bf16_copies and not len(self.norm_weights)
        self.bf16_copies = Bf16Copies([*self.weights, *self.biases]) if copies else None

    def start_epoch(self, epoch: int, rank: int) -> None:
        self.step, self.rank = 0, rank
        if self.masks == "counter":  # by the image's place in the whole batch, not the process: rank 0's keys
            self.counter.start_epoch(epoch, 0)
        else:
            self.generators.start_epoch(epoch, rank, self.weights[0].device)

    def _member_dropout(
        self, x: torch.Tensor, index: int, p: float, relu: bool, conv: bool, members: slice = slice(None)
    ) -> torch.Tensor:
        # Each member draws its own mask of its own shape, so a member's masks do not depend on K.
        generators = self.generators.generators[members]
        shape = (x.shape[0], x.shape[1] // len(generators), *x.shape[2:]) if conv else x.shape[1:]
        keep = torch.stack([keep_mask(shape, p, g) for g in generators], dim=1 if conv else 0)
        keep = keep.view(x.shape)
        if relu:
            return ReluDropout.apply(x, keep, 1 / (1 - p))
        return x * keep.to(x.dtype) * (1 / (1 - p))

    def _counter_dropout(self, images: torch.Tensor) -> Callable[..., torch.Tensor]:
        """This training step's dropout: every layer's multipliers drawn at once, at its first dropout layer (when
        the activations' dtype is known: bf16 under autocast), then served layer by layer."""
        image_shape = tuple(images.shape[2:])
        if image_shape not in self._dropout_layers:  # units per image of each dropout layer: a pass on no data
            layers = []

            def record(x, index, p, relu, conv):
                layers.append((x.numel() // (self.k * 2), p))  # two images: a batch norm trains on more than one
                return x

            meta = [[w.to("meta") for w in params] for params in (self.weights, self.biases)]
            norms = [[t.to("meta") for t in norm] for norm in self.norms()]
            with torch.no_grad():  # the running statistics stay as they are
                self._run(torch.empty((self.k, 2, *image_shape), device="meta"), *meta, record, norms)
            self._dropout_layers[image_shape] = tuple(layers)
        layers, batch, chunks = self._dropout_layers[image_shape], images.shape[1], []

        def dropout(x, index, p, relu, conv, members=slice(None)):
            if not chunks:
                first = self.rank * batch  # DDP: this process's share starts there in every batch (even shares)
                masks = self.counter.scaled_masks(self.step, batch, layers, x.dtype, x.device, first)
                chunks.extend(masks.split([units for units, _ in layers], dim=2))
            mask = chunks[index][members]  # [K, B, units]
            if conv:  # to the layout [B, K * C, H, W]
                mask = mask.reshape(mask.shape[0], batch, -1, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
            return (F.relu(x) if relu else x) * mask

        return dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = self.weights, self.biases
        if self.bf16_copies is not None and self.bf16_copies.apply_to(x.device.type):
            copies = self.bf16_copies.current()
            weights, biases = copies[: len(weights)], copies[len(weights) :]
        dropout = None
        if self.training:
            dropout = self._counter_dropout(x) if self.masks == "counter" else self._member_dropout
        sizes, norms = self.member_groups(x.device), self.norms()
        if len(sizes) == 1:
            out = self._run(x, weights, biases, dropout, norms)
        else:  # each group of members through the whole network in turn; split's backward is one concatenation
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            weights, biases = (
                [p.split([p.shape[0] // self.k * size for size in sizes]) for p in params]
                for params in (weights, biases)
            )
            shares = [
                [
                    t.split([t.shape[0] // self.k * size for size in sizes]) if t.dim() else [t] * len(sizes)
                    for t in norm
                ]
                for norm in norms
            ]
            out = torch.cat(
                [
                    self._run(
                        x[start : start + size],
                        [p[i] for p in weights],
                        [p[i] for p in biases],
                        None if dropout is None else functools.partial(dropout, members=slice(start, start + size)),
                        [[t[i] for t in norm] for norm in shares],
                    )
                    for i, (start, size) in enumerate(zip(starts, sizes))
                ]
            )
        self.step += self.training
        if self.training:  # what nn.BatchNorm counts (its momentum is set: the count decides nothing here)
            for norm in norms:
                if len(norm) > 2:  # a batch norm's [weight, bias, mean, var, batches]
                    norm[4].add_(1)
        return out

    def member_groups(self, device: torch.device) -> list[int]:
        """How many members run through the network at once, group after group: all of them, but for a conv
        network on a CPU groups of at most ``cpu_conv_group``. 18 members' conv activations (~0.5 GB a
        step) do not fit the caches, and their ReLUs, pooling and copies then take as long as the convolutions:
        an 18-member CNN step took 0.78 s at once, 0.55 s in groups of 3. The groups are as even as they can be,
        so that none holds a lone member: oneDNN runs a convolution of one group with another kernel than a
        grouped one, with other last bits, where a grouped convolution computes each group the same way at any
        number of groups (a test: the same numbers as all members at once, bit for bit)."""
        convolves = any(step == "conv" for step, _ in self.plan)
        if not (convolves and device.type == "cpu" and self.cpu_conv_group) or self.k <= 2:
            return [self.k]
        count = math.ceil(self.k / max(self.cpu_conv_group, 2))
        return [self.k // count + (i < self.k % count) for i in range(count)]

    def norms(self) -> list[list[torch.Tensor]]:
        """Each norm layer's ``[weight, bias]``, and a batch norm's running mean, variance and batch count (its
        buffers, read each time: moving the module to a device replaces them)."""
        return [
            [w, b, *[getattr(self, f"{kind}_{i}") for kind in BATCH_STATS if hasattr(self, f"batches_{i}")]]
            for i, (w, b) in enumerate(zip(self.norm_weights, self.norm_biases))
        ]

    def _run(
        self, x: torch.Tensor, weights, biases, dropout: Callable[..., torch.Tensor] | None, norms: list
    ) -> torch.Tensor:
        """The plan's steps on ``x``; ``dropout(x, index, p, relu, conv)`` applies dropout layer ``index`` (None: no
        dropout, as in evaluation); ``norms`` the norm layers' tensors (``norms()``, of these members)."""
        k, batch = x.shape[:2]
        conv = False  # layout: [K, B, ...] (image or dense) or [B, K * C, H, W] (conv)
        dropped = 0
        for step, arg in self.plan:
            spatial = step in ("conv", "pool", "avgpool", "adaptive_avgpool") or (step == "batchnorm" and x.dim() == 5)
            if spatial and not conv:  # the image layout [K, B, C, H, W] to the conv layout
                x = x.transpose(0, 1).reshape(batch, -1, *x.shape[-2:]).contiguous(memory_format=torch.channels_last)
                conv = True
            match step:
                case "conv":
                    param, stride, padding = arg
                    x = F.conv2d(x, weights[param], biases[param], stride, padding, groups=k)
                case "batchnorm":
                    index, momentum, eps = arg
                    weight, bias, mean, var, _ = norms[index]
                    dense = x.transpose(0, 1).reshape(batch, -1) if not conv else x  # [B, K * F]: one member's F
                    out = F.batch_norm(dense, mean, var, weight, bias, self.training, momentum, eps)
                    x = out if conv else out.view(batch, k, -1).transpose(0, 1)
                case "layernorm":
                    index, eps = arg
                    weight, bias = norms[index]
                    x = torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=eps), weight)
                case "avgpool":
                    x = F.avg_pool2d(x, *arg)
                case "adaptive_avgpool":
                    x = F.adaptive_avg_pool2d(x, arg)
                case "gelu":
                    x = F.gelu(x, approximate=arg)
                case "linear":
                    x = torch.baddbmm(biases[arg], x, weights[arg])
                case "flatten":
                    x = x.reshape(batch, k, -1).transpose(0, 1) if conv else x.reshape(k, batch, -1)
                    conv = False
                case "pool":
                    x = F.max_pool2d(x, *arg)
                case "relu_dropout" | "dropout" if dropout is not None:
                    x = dropout(x, dropped, arg, step == "relu_dropout", conv)
                    dropped += 1
                case "relu_dropout" | "relu":
                    x = F.relu(x)
        return x

    def member(self, k: int) -> nn.Module:
        """Member ``k`` as a plain network of its own class, with its current weights."""
        net = copy.deepcopy(self.template[0])
        params, norms = iter(zip(self.weights, self.biases)), iter(self.norms())
        with torch.no_grad():
            for layer in net:
                if isinstance(layer, nn.Linear):
                    w, b = next(params)
                    layer.weight.copy_(w[k].t())
                    layer.bias.copy_(b[k, 0])
                elif isinstance(layer, nn.Conv2d):
                    w, b = next(params)
                    out = layer.out_channels
                    layer.weight.copy_(w[k * out : (k + 1) * out])
                    layer.bias.copy_(b[k * out : (k + 1) * out])
                elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                    weight, bias, *stats = next(norms)
                    size = weight.shape[0] // self.k
                    mine = slice(k * size, (k + 1) * size) if stats else k  # batch norm: [K * C]; layer: [K, 1, F]
                    layer.weight.copy_(weight[mine].reshape(layer.weight.shape))
                    layer.bias.copy_(bias[mine].reshape(layer.bias.shape))
                    if stats:
                        layer.running_mean.copy_(stats[0][mine])
                        layer.running_var.copy_(stats[1][mine])
                        layer.num_batches_tracked.copy_(stats[2])
        return net.train(self.training)


class MemberLoop(nn.Module):
    """Any ``nn.Module``, K times, run one member after another (for networks StackedSequential cannot stack).

    Member k's dropout draws from the global RNG reseeded from (seed, epoch, rank, step) around its
    forward pass, so its masks depend on neither K nor the other members.
    """

    bf16_copies = None  # autocast's own casts, member by member

    def __init__(self, members: list[nn.Module], seeds: list[int]):
        super().__init__()
        self.members, self.seeds = nn.ModuleList(members), seeds
        self.epoch, self.rank, self.step = 0, 0, 0

    def start_epoch(self, epoch: int, rank: int) -> None:
        self.epoch, self.rank, self.step = epoch, rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        devices = [x.device] if x.device.type == "cuda" else []
        for net, seed, images in zip(self.members, self.seeds, x):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed("dropout", seed, self.epoch, self.rank, self.step))
                outputs.append(net(images))
        self.step += self.training
        return torch.stack(outputs)

    def member(self, k: int) -> nn.Module:
        return self.members[k]


def stack_members(
    factory: Callable[[], nn.Module], seeds: list[int], masks: str = DEFAULT_MASKS, compiled: bool = False
) -> StackedSequential | MemberLoop:
    """One network per seed from ``factory``, stacked when its layers allow, else looped over."""
    return stack([build_member(factory, seed) for seed in seeds], seeds, masks, compiled)


def stack(
    members: list[nn.Module], seeds: list[int], masks: str = DEFAULT_MASKS, compiled: bool = False
) -> StackedSequential | MemberLoop:
    """``members`` (one network each, of one class; ``seeds`` their dropout streams) as one module, stacked
    when their layers allow (``compiled``: the counter masks' hash through ``torch.compile``), else looped over
    (each member's dropout from the global generator, whatever ``masks`` says)."""
    if stackable(members[0]):
        return StackedSequential(members, seeds, masks, compiled)
    return MemberLoop(members, seeds)
