"""K networks as one: parameters stacked along a leading member axis, one random stream per member.

Member ``k`` computes exactly what its network would compute alone: its weights are built from its
own seed, and its dropout masks come from its own generator, reseeded from (seed, epoch, rank) when
an epoch starts. Stacking changes only the floating-point summation order of the matrix products.

Two implementations of the same math, chosen by ``fast``:
- fast: dropout masks from 16 random bits per unit (4 units per 64-bit draw, ~7x cheaper than
  ``bernoulli_`` on a CPU), ReLU and dropout fused into one multiplication by a saved mask, and an
  RMSprop step that reuses its buffers;
- reference: ``bernoulli_`` masks (what ``nn.Dropout`` draws), ReLU and dropout as separate ops, and
  ``torch.optim.RMSprop``.
"""

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from noise_robustness.noise import derive_seed

KEEP_BITS = 16  # random bits per dropout decision: P(keep) is exact to 2**-16 (3e-6 for p = 0.2)


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
    convolutions over ``[B, K * channels, H, W]`` (group k = member k). Input ``[K, B, ...]``, output
    ``[K, B, classes]``.
    """

    def __init__(self, members: list[nn.Sequential], seeds: list[int], fast: bool = True):
        super().__init__()
        self.k, self.fast = len(members), fast
        self.template = [copy.deepcopy(members[0])]  # in a list: a pattern for `member()`, not a submodule
        self.plan = plan_steps(list(members[0]))
        self.generators = MemberGenerators(seeds)
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

    def start_epoch(self, epoch: int, rank: int) -> None:
        self.generators.start_epoch(epoch, rank, self.weights[0].device)

    def _dropout(self, x: torch.Tensor, p: float, relu: bool, conv: bool) -> torch.Tensor:
        # Each member draws its own mask of its own shape, so a member's masks do not depend on K.
        k = self.k
        shape = (x.shape[0], x.shape[1] // k, *x.shape[2:]) if conv else x.shape[1:]
        keep = torch.stack(
            [keep_mask(shape, p, g, self.fast) for g in self.generators.generators], dim=1 if conv else 0
        )
        keep = keep.view(x.shape)
        if self.fast and relu:
            return _ReluDropout.apply(x, keep, 1 / (1 - p))
        x = F.relu(x) if relu else x
        return x * keep.to(x.dtype) * (1 / (1 - p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, batch = x.shape[:2]
        conv = False  # layout: [K, B, ...] (dense) or [B, K * C, H, W] (conv)
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
                    x = F.conv2d(x, self.weights[param], self.biases[param], stride, padding, groups=k)
                case "linear":
                    x = torch.baddbmm(self.biases[arg], x, self.weights[arg])
                case "flatten":
                    x = x.reshape(batch, k, -1).transpose(0, 1) if conv else x.reshape(k, batch, -1)
                    conv = False
                case "pool":
                    x = F.max_pool2d(x, *arg)
                case "relu_dropout":
                    x = self._dropout(x, arg, relu=True, conv=conv) if self.training else F.relu(x)
                case "relu":
                    x = F.relu(x)
                case "dropout":
                    x = self._dropout(x, arg, relu=False, conv=conv) if self.training else x
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
    factory: Callable[[], nn.Module], seeds: list[int], fast: bool = True
) -> StackedSequential | MemberLoop:
    """One network per seed from ``factory``, stacked when its layers allow, else looped over."""
    return stack([build_member(factory, seed) for seed in seeds], seeds, fast)


def stack(members: list[nn.Module], seeds: list[int], fast: bool = True) -> StackedSequential | MemberLoop:
    """``members`` (one network each, of one class; ``seeds`` their dropout streams) as one module, stacked
    when their layers allow, else looped over."""
    if stackable(members[0]):
        return StackedSequential(members, seeds, fast)
    return MemberLoop(members, seeds)


class StackedRMSprop(torch.optim.Optimizer):
    """RMSprop (no momentum, not centred, no weight decay), the update of ``torch.optim.RMSprop``.

    ``v = alpha * v + (1 - alpha) * g**2;  p -= lr * g / (sqrt(v) + eps)``, in place, with the
    denominator written into a buffer kept from step to step instead of a fresh tensor each step.
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # no step count: without bias correction it would decide nothing, at an op a step
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                square_avg, grad = state["square_avg"], p.grad
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
                denom = state.get("_denom")
                if denom is None or denom.shape != p.shape:
                    denom = state["_denom"] = torch.empty_like(p)
                torch.sqrt(square_avg, out=denom).add_(eps)
                p.addcdiv_(grad, denom, value=-lr)
        return loss

    def state_dict(self):
        state = super().state_dict()  # the scratch buffer is not state: leave it out of checkpoints
        state["state"] = {k: {n: v for n, v in s.items() if n != "_denom"} for k, s in state["state"].items()}
        return state
