"""Dropout masks for stacked members: each member's masks depend on its own seed only, never on K or its position.

Two sources (``masks``):
- ``per_member``: each member draws from its own generator, reseeded from (seed, epoch, rank) when an epoch starts
  (``MemberGenerators``): three operations per member and dropout layer a step;
- ``counter``: every member's and layer's masks in one draw a step, from a counter-based hash of (member seed, epoch,
  rank, step) and the unit's index (``CounterMasks``): the same operations at any K, and the same bits on any device.
"""

import math

import torch

from noise_robustness.data.noise import derive_seed

KEEP_BITS = 16  # random bits per dropout decision: P(keep) is exact to 2**-16 (3e-6 for p = 0.2)
MASKS = ("per_member", "counter")  # where dropout masks come from (see the module docstring)
DEFAULT_MASKS = "counter"  # the engine's and the study's default


def keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask of ``shape``: each unit kept with probability 1 - p (exact to 2**-16), independently, from 16
    random bits per unit (four units per 64-bit draw: ~7x cheaper than ``bernoulli_`` on a CPU)."""
    device = generator.device
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # all 64 bits (the default range leaves the top bit 0)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-2**15, 2**15)
    threshold = round((1 - p) * 2**KEEP_BITS) - 2 ** (KEEP_BITS - 1)
    return bits < threshold


class ReluDropout(torch.autograd.Function):
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
        self,
        step: int,
        images: int,
        layers: tuple[tuple[int, float], ...],
        dtype: torch.dtype,
        device: torch.device,
        first: int = 0,
    ) -> torch.Tensor:
        """``[K, images, U]`` in ``dtype``: every member's dropout multipliers at ``step``, 1 / (1 - p) for a kept
        unit and 0 for a dropped one; ``layers`` gives each dropout layer's units per image and p, in order. The
        images are ``first`` to ``first + images - 1`` of the step's batch (a DDP process's share: its masks are the
        ones one process draws for those images)."""
        key = (images, layers, dtype, device, first)
        if key not in self.constants:
            units = [n for n, _ in layers]
            counters = torch.arange(first * sum(units), (first + images) * sum(units), dtype=torch.int32, device=device)
            self.constants[key] = (
                lowbias32(counters).view(images, -1),
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
