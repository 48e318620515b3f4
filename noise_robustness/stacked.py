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

Two implementations of the same math, chosen by ``fast``:
- fast: dropout masks from 16 random bits per unit (4 units per 64-bit draw, ~7x cheaper than
  ``bernoulli_`` on a CPU), ReLU and dropout fused into one multiplication by a saved mask, and an
  RMSprop step as five multi-tensor (``_foreach``) operations (six on a CPU: ``state_floor``);
- reference: ``bernoulli_`` masks (what ``nn.Dropout`` draws), ReLU and dropout as separate ops, and
  ``torch.optim.RMSprop``.

Under bf16 autocast the fast path also keeps bf16 copies of the weights that the optimizer step writes
(``Bf16Copies``), instead of autocast casting every weight to bf16 and every gradient back to fp32 each step:
the same numbers, bit for bit.
"""

import contextlib
import copy
import functools
import math
import shutil
import struct
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from noise_robustness.noise import derive_seed

KEEP_BITS = 16  # random bits per dropout decision: P(keep) is exact to 2**-16 (3e-6 for p = 0.2)
MASKS = ("per_member", "counter")  # where dropout masks come from (see the module docstring)


def build_member(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with its initial weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("init", seed))
        return factory()


def keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator, fast: bool) -> torch.Tensor:
    """A boolean mask of ``shape``: each unit kept with probability 1 - p, independently."""
    device = generator.device
    if not fast:
        return torch.empty(shape, device=device).bernoulli_(1 - p, generator=generator).bool()
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # all 64 bits (the default range leaves the top bit 0)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-2**15, 2**15)
    threshold = round((1 - p) * 2**KEEP_BITS) - 2 ** (KEEP_BITS - 1)
    return bits < threshold


class _ReluDropout(torch.autograd.Function):
    """``relu(x) * keep / (1 - p)`` as one multiplication by a saved mask, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        mask = (keep & (x > 0)).to(x.dtype).mul_(scale)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


class MemberGenerators:
    """One dropout generator per member, reseeded from (member seed, epoch, rank) at each epoch start."""

    def __init__(self, seeds: list[int]):
        self.seeds, self.generators = seeds, []

    def start_epoch(self, epoch: int, rank: int, device: torch.device) -> None:
        self.generators = [
            torch.Generator(device=device).manual_seed(derive_seed("dropout", s, epoch, rank)) for s in self.seeds
        ]


def _int32(value: int) -> int:
    """``value`` modulo 2**32 as a signed 32-bit integer (the hash's arithmetic is two's complement int32)."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


MIX = (_int32(0x7FEB352D), _int32(0x846CA68B))  # lowbias32's multipliers (C. Wellons' hash prospector)


def _xorshift_(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x ^= x >>> shift`` in place: a logical shift (torch's is arithmetic on int32, so mask the sign copies)."""
    return x.bitwise_xor_(torch.bitwise_right_shift(x, shift).bitwise_and_((1 << (32 - shift)) - 1))


def _finish_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32's core, in place: multiply, xorshift, multiply."""
    return _xorshift_(x.mul_(MIX[0]), 15).mul_(MIX[1])


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' ``lowbias32`` integer hash of an int32 tensor (a bijection on 32-bit words), in place."""
    return _xorshift_(_finish_(_xorshift_(x, 16)), 16)


class CounterMasks:
    """Dropout masks for every member and dropout layer in one draw a step, a pure function of (member seed,
    epoch, rank, step, unit): a counter-based random function, no generator state.

    Unit ``u`` of image ``b`` (the units of a step's dropout layers side by side, ``U`` an image) has the counter
    ``c = b * U + u``; its word is ``finish(lowbias32(c) ^ key)`` with ``key`` the member's 32 bits for (seed,
    epoch, rank, step) (``derive_seed``) and ``finish`` lowbias32's multiply-xorshift-multiply (``_finish_``). The
    unit is kept when the word, read as a signed 32-bit integer, is below its layer's
    ``round((1 - p) * 2**32) - 2**31``: P(keep) exact to 2**-32. ``lowbias32(c)`` is kept between steps, so a
    step costs one xor, two multiplications, one xorshift, one comparison and the scaling over all members'
    units, however many members there are. The arithmetic is two's-complement int32, the same on a CPU and a GPU.
    """

    STEPS = 512  # member keys are derived a block of steps at a time

    def __init__(self, seeds: list[int], compiled: bool = False):
        self.seeds = seeds
        # integer arithmetic: compiled into one pass, the same bits as the eight passes eager
        self.multipliers = (
            torch.compile(counter_multipliers, fullgraph=True, dynamic=False) if compiled else counter_multipliers
        )
        self.epoch = self.rank = 0
        self.keys = torch.empty(0, len(seeds), 1, 1, dtype=torch.int32)  # [steps, K, 1, 1]: this epoch's, so far
        self.held_keys: torch.Tensor | None = None  # [K, 1, 1], filled by `hold_keys`: what a step then reads
        # (images, layers, dtype, device) -> lowbias32(c) [images, U], thresholds [U], scales [U]
        self.constants: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def start_epoch(self, epoch: int, rank: int) -> None:
        self.epoch, self.rank = epoch, rank
        self.keys = self.keys[:0]

    def member_keys(self, step: int, device: torch.device) -> torch.Tensor:
        """``[K, 1, 1]`` int32: each member's key for ``step`` of this epoch (a block of steps derived at a time)."""
        while step >= len(self.keys):
            first = len(self.keys)
            block = [
                [[[_int32(derive_seed("dropout", seed, self.epoch, self.rank, s))]] for seed in self.seeds]
                for s in range(first, first + self.STEPS)
            ]
            self.keys = torch.cat([self.keys.to(device), torch.tensor(block, dtype=torch.int32, device=device)])
        return self.keys[step]

    def hold_keys(self, step: int, device: torch.device) -> None:
        """Copies ``step``'s member keys into ``held_keys``, which ``scaled_masks`` reads from then on instead of
        looking a step's keys up: a captured CUDA graph (``graphs.StepGraphs``) reads its keys from one place,
        filled before each replay."""
        keys = self.member_keys(step, device)
        if self.held_keys is None or self.held_keys.device != keys.device:
            self.held_keys = torch.empty_like(keys)
        self.held_keys.copy_(keys)

    def scaled_masks(
        self, step: int, images: int, layers: tuple[tuple[int, float], ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``[K, images, U]`` in ``dtype``: every member's dropout multipliers at ``step``, 1 / (1 - p) for a kept
        unit and 0 for a dropped one; ``layers`` gives each dropout layer's units per image and p, in order."""
        key = (images, layers, dtype, device)
        if key not in self.constants:
            units = [n for n, _ in layers]
            self.constants[key] = (
                lowbias32(torch.arange(images * sum(units), dtype=torch.int32, device=device)).view(images, -1),
                torch.tensor([round((1 - p) * 2**32) - 2**31 for _, p in layers], device=device)
                .to(torch.int32)
                .repeat_interleave(torch.tensor(units, device=device)),
                torch.tensor([1 / (1 - p) for _, p in layers], device=device)
                .to(dtype)
                .repeat_interleave(torch.tensor(units, device=device)),
            )
        counters, thresholds, scales = self.constants[key]
        keys = self.member_keys(step, device) if self.held_keys is None else self.held_keys
        return self.multipliers(counters, keys, thresholds, scales)


def counter_multipliers(
    counters: torch.Tensor, keys: torch.Tensor, thresholds: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """``CounterMasks``' multipliers ``[K, images, U]`` from ``lowbias32(c)`` ``[images, U]``, the members' keys
    ``[K, 1, 1]`` and each unit's threshold and scale ``[U]``."""
    keep = _finish_(torch.bitwise_xor(counters, keys)) < thresholds
    if torch.compiler.is_compiling():  # one fused pass; the byte view below would stop the fusion
        return keep.to(scales.dtype).mul_(scales)
    # Eager, a CPU reads a mask's bytes as uint8 several times faster than as bool (and than torch.where), and
    # multiplies uint8 by bf16 in one pass (one operation a step fewer), but by fp32 ~10x slower than converting first.
    keep = keep.view(torch.uint8)
    if scales.dtype == torch.float32 and keep.device.type == "cpu":
        return keep.to(scales.dtype).mul_(scales)
    return keep * scales


class Bf16Copies:
    """bf16 copies of fp32 parameters for bf16 autocast, written by the optimizer step that updates them.

    Under autocast every matrix product casts its fp32 weights to bf16 (a copy of every weight a step), and the
    backward pass casts their bf16 gradients back to fp32 (another). With these copies the forward pass reads bf16
    leaf tensors that hold exactly those casts, their gradients stay bf16 until the optimizer reads them (as fp32,
    the cast autocast would have made), and the optimizer writes the next casts in the same pass as its update:
    autocast's numbers bit for bit, without its copies. A copy is cast again whenever its parameter changed other
    than through the optimizer (a checkpoint loaded, weights set by hand): each parameter's version counter, which
    every in-place write advances, is compared at each forward pass.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.enabled = True  # off where something reads or adds to the parameters' gradients before the step
        self.copies: list[torch.Tensor] = []
        self.versions: list[tuple[int, torch.device]] = []  # what each copy was cast from

    def apply_to(self, device_type: str) -> bool:
        """Whether a forward pass now runs on the copies: under bf16 autocast, on fp32 parameters, and outside
        DDP (whose reducer waits for the parameters' own gradients; autocast's casts there, the same numbers)."""
        return (
            self.enabled
            and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16
            and all(p.dtype == torch.float32 for p in self.params)
            and not torch.distributed.is_initialized()
        )

    def _sources(self) -> list[tuple[int, torch.device]]:
        return [(p._version, p.device) for p in self.params]

    def current(self) -> list[torch.Tensor]:
        """The copies, cast again from any parameter changed since they were written."""
        if self._sources() != self.versions:
            with torch.no_grad():
                if [(c.shape, c.device) for c in self.copies] == [(p.shape, p.device) for p in self.params]:
                    torch._foreach_copy_(self.copies, self.params)  # in place: a captured graph reads these tensors
                else:
                    self.copies = [p.detach().to(torch.bfloat16).requires_grad_(p.requires_grad) for p in self.params]
            self.versions = self._sources()
        return self.copies

    def gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter: its copy}`` for every copy with a gradient (a backward pass ran on the copies)."""
        return {p: c for p, c in zip(self.params, self.copies) if c.grad is not None}

    def written(self) -> None:
        """The optimizer wrote every copy from its updated parameter."""
        self.versions = self._sources()

    def zero_grad(self) -> None:
        for c in self.copies:
            c.grad = None


SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.Flatten)


def stackable(net: nn.Module) -> bool:
    """Whether ``net`` is an ``nn.Sequential`` of layers that :class:`StackedSequential` stacks."""
    if not isinstance(net, nn.Sequential) or not all(isinstance(layer, SUPPORTED) for layer in net):
        return False
    convs = [layer for layer in net if isinstance(layer, nn.Conv2d)]
    return all(
        c.groups == 1 and c.dilation == (1, 1) and c.padding_mode == "zeros" and isinstance(c.padding, tuple)
        for c in convs
    )


def plan_steps(layers: list[nn.Module]) -> list[tuple[str, object]]:
    """The steps of a stacked forward pass, decided once when the network is stacked.

    Two rewrites give the same numbers and gradients with less work: a ReLU before a max-pool runs
    after it (ReLU is monotone, so the two commute; a quarter of the values), and a ReLU followed by
    dropout is one step (one multiplication by a saved mask when training). Dropout with p = 0 is
    no step. Each step is ``(kind, argument)``: ``("conv", (param, stride, padding))``,
    ``("linear", param)``, ``("flatten", None)``, ``("pool", (kernel, stride, padding))``,
    ``("relu", None)``, ``("relu_dropout", p)``, ``("dropout", p)``; ``param`` indexes the stacked weights.
    """
    layers = list(layers)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    steps, param, i = [], 0, 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Conv2d):
            steps.append(("conv", (param, layer.stride, layer.padding)))
            param += 1
        elif isinstance(layer, nn.Linear):
            steps.append(("linear", param))
            param += 1
        elif isinstance(layer, nn.Flatten):
            steps.append(("flatten", None))
        elif isinstance(layer, nn.MaxPool2d):
            steps.append(("pool", (layer.kernel_size, layer.stride, layer.padding)))
        elif isinstance(layer, nn.ReLU) and isinstance(following, nn.Dropout) and following.p > 0:
            steps.append(("relu_dropout", following.p))
            i += 1  # the dropout is part of this step
        elif isinstance(layer, nn.ReLU):
            steps.append(("relu", None))
        elif isinstance(layer, nn.Dropout) and layer.p > 0:
            steps.append(("dropout", layer.p))
        i += 1
    return steps


class StackedSequential(nn.Module):
    """K copies of one ``nn.Sequential`` (Linear, Conv2d, ReLU, Dropout, MaxPool2d, Flatten), run as one.

    Dense layers are batched matrix products over ``[K, B, features]``; convolutions are grouped
    convolutions over ``[B, K * channels, H, W]`` (group k = member k; on a CPU a few members at a time,
    ``member_groups``). Input ``[K, B, ...]``, output ``[K, B, classes]``.
    """

    cpu_conv_group: int | None = 3  # members a conv network runs at once on a CPU (None: all; see member_groups)

    def __init__(
        self,
        members: list[nn.Sequential],
        seeds: list[int],
        fast: bool = True,
        masks: str = "per_member",
        compiled: bool = False,
        bf16_copies: bool = True,
    ):
        super().__init__()
        if masks not in MASKS:
            raise ValueError(f"Expected `masks` to be one of {MASKS}, but got {masks!r}")
        self.k, self.fast, self.masks = len(members), fast, masks
        self.template = [copy.deepcopy(members[0])]  # in a list: a pattern for `member()`, not a submodule
        self.plan = plan_steps(list(members[0]))
        self.generators, self.counter = MemberGenerators(seeds), CounterMasks(seeds, compiled)
        self.step = 0  # training steps this epoch (the counter masks' step)
        self._dropout_layers: dict[tuple[int, ...], tuple[tuple[int, float], ...]] = {}  # image shape -> (units, p)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
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
        # under bf16 autocast (fast path): weights as [*weights, *biases] in bf16, written by the optimizer
        self.bf16_copies = Bf16Copies([*self.weights, *self.biases]) if fast and bf16_copies else None

    def start_epoch(self, epoch: int, rank: int) -> None:
        self.step = 0
        if self.masks == "counter":
            self.counter.start_epoch(epoch, rank)
        else:
            self.generators.start_epoch(epoch, rank, self.weights[0].device)

    def _member_dropout(
        self, x: torch.Tensor, index: int, p: float, relu: bool, conv: bool, members: slice = slice(None)
    ) -> torch.Tensor:
        # Each member draws its own mask of its own shape, so a member's masks do not depend on K.
        generators = self.generators.generators[members]
        shape = (x.shape[0], x.shape[1] // len(generators), *x.shape[2:]) if conv else x.shape[1:]
        keep = torch.stack([keep_mask(shape, p, g, self.fast) for g in generators], dim=1 if conv else 0)
        keep = keep.view(x.shape)
        if self.fast and relu:
            return _ReluDropout.apply(x, keep, 1 / (1 - p))
        x = F.relu(x) if relu else x
        return x * keep.to(x.dtype) * (1 / (1 - p))

    def _counter_dropout(self, images: torch.Tensor) -> Callable[..., torch.Tensor]:
        """This training step's dropout: every layer's multipliers drawn at once, at its first dropout layer (when
        the activations' dtype is known: bf16 under autocast), then served layer by layer."""
        image_shape = tuple(images.shape[2:])
        if image_shape not in self._dropout_layers:  # units per image of each dropout layer: a pass on no data
            layers = []

            def record(x, index, p, relu, conv):
                layers.append((x.numel() // self.k, p))
                return x

            meta = [[w.to("meta") for w in params] for params in (self.weights, self.biases)]
            self._run(torch.empty((self.k, 1, *image_shape), device="meta"), *meta, record)
            self._dropout_layers[image_shape] = tuple(layers)
        layers, batch, chunks = self._dropout_layers[image_shape], images.shape[1], []

        def dropout(x, index, p, relu, conv, members=slice(None)):
            if not chunks:
                masks = self.counter.scaled_masks(self.step, batch, layers, x.dtype, x.device)
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
        sizes = self.member_groups(x.device)
        if len(sizes) == 1:
            out = self._run(x, weights, biases, dropout)
        else:  # each group of members through the whole network in turn; split's backward is one concatenation
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            weights, biases = (
                [p.split([p.shape[0] // self.k * size for size in sizes]) for p in params]
                for params in (weights, biases)
            )
            out = torch.cat(
                [
                    self._run(
                        x[start : start + size],
                        [p[i] for p in weights],
                        [p[i] for p in biases],
                        None if dropout is None else functools.partial(dropout, members=slice(start, start + size)),
                    )
                    for i, (start, size) in enumerate(zip(starts, sizes))
                ]
            )
        self.step += self.training
        return out

    def member_groups(self, device: torch.device) -> list[int]:
        """How many members run through the network at once, group after group: all of them, but for a conv
        network on a CPU (fast path) groups of at most ``cpu_conv_group``. 18 members' conv activations (~0.5 GB a
        step) do not fit the caches, and their ReLUs, pooling and copies then take as long as the convolutions:
        an 18-member CNN step took 0.78 s at once, 0.55 s in groups of 3. The groups are as even as they can be,
        so that none holds a lone member: oneDNN runs a convolution of one group with another kernel than a
        grouped one, with other last bits, where a grouped convolution computes each group the same way at any
        number of groups (a test: the same numbers as all members at once, bit for bit)."""
        convolves = any(step == "conv" for step, _ in self.plan)
        if not (self.fast and convolves and device.type == "cpu" and self.cpu_conv_group) or self.k <= 2:
            return [self.k]
        count = math.ceil(self.k / max(self.cpu_conv_group, 2))
        return [self.k // count + (i < self.k % count) for i in range(count)]

    def _run(self, x: torch.Tensor, weights, biases, dropout: Callable[..., torch.Tensor] | None) -> torch.Tensor:
        """The plan's steps on ``x``; ``dropout(x, index, p, relu, conv)`` applies dropout layer ``index`` (None: no
        dropout, as in evaluation)."""
        k, batch = x.shape[:2]
        conv = False  # layout: [K, B, ...] (dense) or [B, K * C, H, W] (conv)
        dropped = 0
        for step, arg in self.plan:
            match step:
                case "conv":
                    if not conv:
                        x = (
                            x.transpose(0, 1)
                            .reshape(batch, -1, *x.shape[-2:])
                            .contiguous(memory_format=torch.channels_last)
                        )
                        conv = True
                    param, stride, padding = arg
                    x = F.conv2d(x, weights[param], biases[param], stride, padding, groups=k)
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
        params = iter(zip(self.weights, self.biases))
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
    factory: Callable[[], nn.Module],
    seeds: list[int],
    fast: bool = True,
    masks: str = "per_member",
    compiled: bool = False,
) -> StackedSequential | MemberLoop:
    """One network per seed from ``factory``, stacked when its layers allow, else looped over."""
    return stack([build_member(factory, seed) for seed in seeds], seeds, fast, masks, compiled)


def stack(
    members: list[nn.Module], seeds: list[int], fast: bool = True, masks: str = "per_member", compiled: bool = False
) -> StackedSequential | MemberLoop:
    """``members`` (one network each, of one class; ``seeds`` their dropout streams) as one module, stacked
    when their layers allow (``compiled``: the counter masks' hash through ``torch.compile``), else looped over
    (each member's dropout from the global generator, whatever ``masks`` says)."""
    if stackable(members[0]):
        return StackedSequential(members, seeds, fast, masks, compiled)
    return MemberLoop(members, seeds)


def rmsprop_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    lr: float,
    alpha: float,
    eps: float,
    floor: float | None = None,
) -> None:
    """``v = alpha * v + (1 - alpha) * g**2;  p -= lr * g / (sqrt(v) + eps)``, in place, per parameter; with
    ``floor`` (``state_floor``), ``v`` is kept at or above it."""
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    if floor is not None:
        torch._foreach_clamp_min_(square_avgs, floor)
    denoms = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, grads, denoms, value=-lr)


def rmsprop_update_bf16(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    copies: list[torch.Tensor],
    lr: float,
    alpha: float,
    eps: float,
    floor: float | None = None,
    widened: list[torch.Tensor] | None = None,
) -> None:
    """``rmsprop_update`` from the bf16 gradients of the parameters' bf16 ``copies`` (read as fp32, the cast
    autocast makes), then each copy written from its updated parameter (``Bf16Copies``). ``widened``: fp32
    buffers kept from step to step that the eager update casts the gradients into (fresh fp32 tensors each step
    cost a CPU ~15 ms more at K = 18: new memory is zeroed page by page); compiled, the cast is fused in."""
    if widened is None:
        grads = [g.float() for g in grads]
    else:
        torch._foreach_copy_(widened, grads)
        grads = widened
    rmsprop_update(params, grads, square_avgs, lr, alpha, eps, floor)
    torch._foreach_copy_(copies, params)


def state_floor(eps: float, device: torch.device) -> float | None:
    """The least RMSprop state ``v`` the update keeps on a CPU (``alpha`` times it still a normal float), or None.

    The state of a weight whose gradient stays zero (a ReLU unit that stopped firing: a fifth of the CNN's dense
    weights by its fourth epoch) decays by ``alpha`` each step into the subnormal floats (below 1.2e-38), and there
    a CPU takes a slow path for every one it reads or writes: MKL's square root even with subnormals flushed, and
    every operation on a thread that does not flush them (``denormals_flushed`` reaches the calling thread only,
    not the other OpenMP threads). With a fifth of the CNN's state subnormal a step took 80 ms longer, and more each
    epoch. Kept at this floor instead the state never goes subnormal, and the parameters nearly always come out
    the same: ``sqrt(v) + eps`` is ``eps`` in fp32 for any ``v`` below 1e-29 at the default eps (checked here for
    the given one; None where the floor would show). Rarely, a lifted state that a later gradient brings to about
    1e-29 rounds one unit differently there, and that member's training drifts (a few members of three committed
    studies: docs/reproducibility.md). None off a CPU: a GPU takes subnormals at full speed."""
    floor = 2 * torch.finfo(torch.float32).tiny  # for any alpha >= 0.5 (the study's 0.9), alpha * floor is normal
    eps32 = float32(eps)  # on the host: a tensor's comparison would read a value back from the device every step
    if device.type != "cpu" or float32(eps32 + float32(math.sqrt(floor))) != eps32:
        return None
    return floor


def float32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (the sum of two is rounded right: a double holds it exactly enough)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@contextlib.contextmanager
def denormals_flushed(device: torch.device):
    """CPU arithmetic with subnormal floats flushed to zero (``torch.set_flush_denormal``), then back to IEEE.

    An x86 core takes a slow microcode path for every subnormal it reads or writes (subnormal gradients, the
    state of weights whose gradient stopped: ``state_floor``). The flag is the calling thread's own: the other
    OpenMP threads of an operation keep IEEE arithmetic (measured: 20 M subnormals multiplied in 95 ms as they
    are, 7 ms flushed on one thread, 59 ms on two), so the state's floor, not this, keeps the update fast.
    Flushed, the parameters come out the same: a subnormal gradient moves no parameter larger than 1e-26 (one at
    exactly zero, a bias no gradient has moved yet, stays there instead of moving by ~1e-34). Only the step runs
    so (the forward and backward passes keep IEEE arithmetic); a process that flushed denormals itself gets IEEE
    arithmetic back after each step (torch has no way to read the setting).
    """
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)


def compiler_missing() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here (no C++ compiler on the PATH), or None."""
    if any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return None
    return "torch.compile builds CPU kernels with a C++ compiler, and none (g++, c++, clang++) is on the PATH"


class StackedRMSprop(torch.optim.Optimizer):
    """RMSprop (no momentum, not centred, no weight decay), the update of ``torch.optim.RMSprop``.

    The update (``rmsprop_update``) runs as five ``_foreach`` operations over all parameters (torch's
    multi-tensor kernels), bit for bit torch's parameters: the same handful of operations however many
    parameters, layers or members there are. On a CPU a sixth keeps the state above the subnormal floats
    (``state_floor``: only states too small to move a parameter differ from torch's). ``compiled`` runs it
    through ``torch.compile`` instead: one fused pass over parameters, gradients and state (five or six passes
    eager: the update is bound by memory traffic, ~3x faster so on a CPU), the same math with last-bit
    differences (fused multiply-adds); compiled once a process (~15 s on a CPU, cached on disk after). With
    ``bf16_copies`` (the stacked network's), a step whose backward pass ran on the copies reads their gradients
    and writes them (``rmsprop_update_bf16``).
    ``graphed``: on a CUDA device, the update is captured as a CUDA graph and replayed, one launch a step, whenever
    the gradients sit in the tensors it was captured on (a replayed ``graphs.StepGraphs`` writes the same ones every
    step); fresh gradient tensors (an eager backward pass) get the eager update.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        compiled: bool = False,
        bf16_copies: Bf16Copies | None = None,
        graphed: bool = False,
    ):
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})
        self.bf16_copies, self.compiled, self.graphed = bf16_copies, compiled, graphed
        self._graph: tuple[torch.cuda.CUDAGraph, tuple[int, ...]] | None = None  # the update, the gradients it reads
        self._last_gradients: tuple[int, ...] = ()  # where the last step's gradients were
        self._widened: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> fp32 buffer of its bf16 gradient
        self.update, self.update_bf16 = (
            (torch.compile(update, fullgraph=True, dynamic=False) for update in (rmsprop_update, rmsprop_update_bf16))
            if compiled
            else (rmsprop_update, rmsprop_update_bf16)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_copies = self.bf16_copies.gradients() if self.bf16_copies is not None else {}
        device = self.param_groups[0]["params"][0].device
        with denormals_flushed(device):
            if self.graphed and device.type == "cuda":
                self._graphed_update(on_copies)
            else:
                self._update(on_copies)
        if on_copies:
            self.bf16_copies.written()
        return loss

    def _update(self, on_copies: dict[torch.Tensor, torch.Tensor]) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None or p in on_copies]
            if not params:
                continue
            for p in params:  # no step count: without bias correction it would decide nothing, at an op a step
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs = [self.state[p]["square_avg"] for p in params]
            hyper = group["lr"], group["alpha"], group["eps"], state_floor(group["eps"], params[0].device)
            if on_copies:
                copies = [on_copies[p] for p in params]
                widened = None if self.compiled else [self.widened(p) for p in params]
                self.update_bf16(params, [c.grad for c in copies], square_avgs, copies, *hyper, widened)
            else:
                self.update(params, [p.grad for p in params], square_avgs, *hyper)

    def _graphed_update(self, on_copies: dict[torch.Tensor, torch.Tensor]) -> None:
        """``_update`` replayed from a CUDA graph when the gradients are in the tensors it was captured on; captured
        when a step finds them where the step before found them (graphed backward passes write the same tensors);
        else eager. Parameters, state and copies never move, so the gradients' places decide."""
        where = tuple(
            (on_copies[p].grad if p in on_copies else p.grad).data_ptr()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None or p in on_copies
        )
        if self._graph is not None and self._graph[1] == where:
            self._graph[0].replay()
            return
        if where != self._last_gradients:
            self._last_gradients = where
            self._update(on_copies)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._update(on_copies)
        self._graph = graph, where
        graph.replay()  # a capture records the kernels without running them

    def widened(self, param: torch.Tensor) -> torch.Tensor:
        """The fp32 buffer the eager bf16 update casts ``param``'s gradient into (not optimizer state: never saved)."""
        if param not in self._widened:
            self._widened[param] = torch.empty_like(param, memory_format=torch.preserve_format)
        return self._widened[param]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.bf16_copies is not None:
            self.bf16_copies.zero_grad()
