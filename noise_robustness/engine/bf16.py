"""bf16 copies of the stacked weights, written by the optimizer step that updates them (the fast path under bf16)."""

import torch
from torch import nn


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
