"""RMSprop for the stacked members: the update of ``torch.optim.RMSprop`` as a few multi-tensor operations.

The update (``rmsprop_update``) runs as five ``_foreach`` operations over all parameters, bit for bit torch's; on a
CPU a sixth keeps the state above the subnormal floats (``state_floor``). ``compiled`` fuses them through
``torch.compile``; with bf16 copies (``bf16.Bf16Copies``) the step reads their gradients and writes them.
"""

import contextlib
import math
import shutil
import struct

import torch

from noise_robustness.engine.bf16 import Bf16Copies


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
    params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor], copies: list[torch.Tensor],
    *hyper: float | None, widened: list[torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """``rmsprop_update`` from the bf16 gradients of the parameters' bf16 ``copies`` (read as fp32, the cast
    autocast makes), then each copy written from its updated parameter (``Bf16Copies``). ``widened``: fp32
    buffers kept from step to step that the eager update casts the gradients into (fresh fp32 tensors each step
    cost a CPU ~15 ms more at K = 18: new memory is zeroed page by page); compiled, the cast is fused in. ``hyper``:
    ``rmsprop_update``'s ``lr, alpha, eps`` and ``floor``."""
    if widened is None:
        grads = [g.float() for g in grads]
    else:
        torch._foreach_copy_(widened, grads)
        grads = widened
    rmsprop_update(params, grads, square_avgs, *hyper)
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
                self.update_bf16(params, [c.grad for c in copies], square_avgs, copies, *hyper, widened=widened)
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
