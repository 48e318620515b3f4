"""The engine's switches and the rules of which run together, in one place.

``fast`` is the engine (the members stacked into one network, ``masks``, ``rmsprop``, ``bf16``); false is torch's own
path, each member's network as built with ``torch.optim.RMSprop``, the reference the engine is tested against.
On top of the engine, ``dropout_masks`` chooses where the masks come from, ``compiled`` fuses the step's elementwise
passes (opt-in: a C++ compiler on a CPU, last-bit differences), and ``graphed`` replays the step from CUDA graphs
(one GPU, one process). What pays on one kind of machine only chooses itself from what the machine is: bf16 and its
copies (``precision.py``: where bf16 is native), the RMSprop state's floor and conv groups (CPUs), the allocator
setting (Linux with glibc: ``memory.py``).
"""

from collections.abc import Callable

import torch
from torch import nn

from noise_robustness.engine.masks import DEFAULT_MASKS
from noise_robustness.engine.rmsprop import StackedRMSprop, compiler_missing
from noise_robustness.engine.stacked import MemberLoop, StackedSequential, build_member, stack_members


def check(fast: bool, dropout_masks: str, compiled: bool, graphed: bool) -> None:
    """Raises ValueError, naming the options, where the switches cannot run together (or here)."""
    if compiled and not fast:
        raise ValueError("`compiled` compiles the fast path's RMSprop step; `fast` false is torch's own, uncompiled")
    if compiled and not torch.cuda.is_available() and (why := compiler_missing()):
        raise ValueError(f"`compiled` needs torch.compile, but {why}; install one or leave it false")
    if not fast and dropout_masks != DEFAULT_MASKS:
        raise ValueError(
            f"`dropout_masks` chooses the engine's masks; `fast` false draws torch's own (`nn.Dropout`): leave it at "
            f"{DEFAULT_MASKS}, or set `fast` true"
        )
    if graphed and not (fast and dropout_masks == "counter"):
        raise ValueError(
            "`graphed` captures the fast path's step with the counter masks: set `fast` true and "
            "`dropout_masks` counter, or leave `graphed` false"
        )


def check_processes(graphed: bool, processes: int) -> None:
    """Raises ValueError where the graphed step would run in more than one process."""
    if graphed and processes > 1:
        raise ValueError(
            f"`model.graphed` trains in one process, but this trainer runs {processes} (DDP reduces gradients "
            "outside the step's graph): leave `graphed` false, or run on one device"
        )


def members_net(
    factory: Callable[[], nn.Module], seeds: list[int], fast: bool, dropout_masks: str, compiled: bool, graphed: bool
) -> nn.Module:
    """The members as one module: stacked by the engine (looped where the layers do not stack), or torch's own
    networks one after another. Each member's weights are drawn from its seed either way."""
    if not fast:  # each member's dropout from its own seed (MemberLoop)
        return MemberLoop([build_member(factory, seed) for seed in seeds], seeds)
    net = stack_members(factory, seeds, dropout_masks, compiled)
    if graphed and not isinstance(net, StackedSequential):
        raise ValueError(
            f"`graphed` captures a stacked network's step; {type(net.members[0]).__name__} does "
            "not stack (engine.stacked.SUPPORTED lists the layers that do): leave `graphed` false"
        )
    return net


def optimizer(
    params, net: nn.Module, fast: bool, lr: float, rho: float, eps: float, compiled: bool, graphed: bool
) -> torch.optim.Optimizer:
    """RMSprop (Keras's: ``rho`` is torch's ``alpha``): the engine's, or ``torch.optim.RMSprop`` on torch's path."""
    if not fast:
        return torch.optim.RMSprop(params, lr=lr, alpha=rho, eps=eps)
    return StackedRMSprop(params, lr, rho, eps, compiled=compiled, bf16_copies=net.bf16_copies, graphed=graphed)


def bf16_copies_serve(net: nn.Module, optimizers: list, gradient_clip_val, accumulate_grad_batches: int) -> bool:
    """Whether the forward pass may run on the bf16 copies (``bf16.Bf16Copies``): only where the step after it
    updates from their gradients straight after the backward pass: the engine's RMSprop, not another
    ``--optimizer``, with nothing reading the parameters' own gradients first (clipping) or adding batches' up.
    Elsewhere autocast's own casts (the same numbers)."""
    return (
        net.bf16_copies is not None
        and len(optimizers) == 1
        and isinstance(optimizers[0], StackedRMSprop)
        and optimizers[0].bf16_copies is net.bf16_copies
        and gradient_clip_val is None
        and accumulate_grad_batches == 1
    )
