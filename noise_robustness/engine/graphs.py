"""A training step's forward and backward pass as CUDA graphs: one launch a step instead of dozens.

On a GPU the study's step is short (a few dozen small kernels), so launching them from Python costs more than
running them. ``StepGraphs`` records the step once per batch shape and replays it; the RMSprop update is
replayed the same way by ``stacked.StackedRMSprop(graphed=True)``. A graph replays the same kernels on the same
memory, so a step may write only tensors that outlive it (parameters' gradients, running sums) and read only
tensors that sit in one place (its inputs are copied into the graph's own before each replay; the dropout keys
are held in one tensor, ``masks.CounterMasks.hold_keys``).
"""

from collections import Counter
from collections.abc import Callable

import torch

WARMUP = 3  # eager steps of a shape before it is captured (PyTorch's recipe: lazy initialisations happen first)


class StepGraphs:
    """Runs ``step(*inputs)`` (forward and backward pass of a training step) as a CUDA graph per input shape.

    A shape's first ``WARMUP`` steps run eagerly, on a side stream (as PyTorch's recipe asks), its next is captured,
    and from then on it is replayed: its inputs copied into the graph's own, one launch. Where the inputs are not
    on a CUDA device, every step runs eagerly: the same function, the same numbers.

    Args:
        step: the step; its backward pass writes the gradients of ``gradient_holders()``.
        gradient_holders: the tensors whose ``.grad`` the step writes (the parameters, or their bf16 copies).
        zero_grad: sets those gradients to None before an eager or captured step (a captured backward pass then
            allocates them in the graph's memory, where each replay writes them).
    """

    def __init__(
        self,
        step: Callable[..., None],
        gradient_holders: Callable[[], list[torch.Tensor]],
        zero_grad: Callable[[], None],
    ):
        self.step, self.gradient_holders, self.zero_grad = step, gradient_holders, zero_grad
        self.seen: Counter[tuple] = Counter()
        # the shape whose graph's gradients the holders hold (None: an eager step's)
        self.gradients_of: tuple | None = None
        # shape -> (graph, its inputs, the gradients it writes as (holder, gradient))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[tuple]]] = {}

    def __call__(self, *inputs: torch.Tensor) -> None:
        if inputs[0].device.type != "cuda":
            self.zero_grad()
            self.step(*inputs)
            return
        shape = tuple((t.shape, t.dtype) for t in inputs)
        if shape not in self.graphs:
            self.seen[shape] += 1
            if self.seen[shape] <= WARMUP:
                self._warmup(inputs)
                return
            self._capture(shape, inputs)
        graph, static_inputs, gradients = self.graphs[shape]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        if self.gradients_of != shape:  # an eager step, or another shape's graph, left other gradients there
            for holder, gradient in gradients:
                holder.grad = gradient
            self.gradients_of = shape

    def _warmup(self, inputs: tuple[torch.Tensor, ...]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.zero_grad()
            self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.gradients_of = None

    def _capture(self, shape: tuple, inputs: tuple[torch.Tensor, ...]) -> None:
        static_inputs = [t.clone() for t in inputs]
        self.zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(*static_inputs)
        gradients = [(h, h.grad) for h in self.gradient_holders() if h.grad is not None]
        self.graphs[shape] = graph, static_inputs, gradients


def graphed_step(net, graphs: StepGraphs, *inputs: torch.Tensor) -> None:
    """One training step of a stacked network ``net`` (``stacked.StackedSequential``, counter masks) through
    ``graphs``: a replayed graph runs no Python, so the step's dropout keys are held for it and its count kept here."""
    index = net.step
    net.counter.hold_keys(index, inputs[0].device)
    graphs(*inputs)
    net.step = index + 1
