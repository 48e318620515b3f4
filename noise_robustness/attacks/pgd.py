"""Projected gradient descent (Madry et al. 2018) against every member of a study at once, under L∞ or L2.

Each member attacks its own copy of the images: the members' losses are summed, and since member k's logits depend
on its own copy only, the gradient with respect to copy k is member k's own loss's (each member's loss is its mean
over the batch, as torchattacks' ``PGD`` and ``PGDL2`` compute it for one model). The loss is the cross-entropy
(``ce``: Madry et al.'s, torchattacks') or Carlini & Wagner's margin (``margin``: the largest other logit minus the
true one). The margin is there because the cross-entropy saturates: for a confident network, softmax rounds the true
class's probability to 1 in float32, its gradient term vanishes and PGD stalls far from the boundary
(``tests/test_attacks.py`` shows it on a linear classifier; docs/attacks.md on the study's MLPs).

A step moves every copy by ``step_size`` along the gradient's sign (L∞) or its per-image unit vector (L2), projects
it back onto the ε-ball around the clean image and clips it to [0, 1]: torchattacks' arithmetic, member by member
(``tests/test_attacks.py`` checks the adversarial images against theirs).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")
GRADIENT_FLOOR = 1e-10  # added to an L2 gradient's norm before dividing (torchattacks' eps_for_division)


@dataclass(frozen=True)
class PGD:
    """An attack: the norm, the radius ε (in [0, 1] pixel units), the steps and their size, whether it starts at a
    random point of the ε-ball (else at the clean image), and the loss it climbs (``LOSSES``)."""

    norm: str
    eps: float
    steps: int = 40
    step_size: float = 0.01
    random_start: bool = False
    loss: str = "ce"

    def check(self) -> None:
        """Raises ValueError naming the option, the value and what is allowed."""
        if self.norm not in NORMS:
            raise ValueError(f"Expected `norm` to be one of {NORMS}, but got {self.norm!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"Expected `loss` to be one of {LOSSES}, but got {self.loss!r}")
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Expected `{name}` to be a finite number >= 0, but got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"Expected `steps` to be a positive integer, but got {self.steps!r}")


def per_image_norms(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image of ``x`` ``[K, B, C, H, W]``, shaped to scale it: ``[K, B, 1, 1, 1]``."""
    return x.flatten(2).norm(p=2, dim=2)[..., None, None, None]


def random_start(clean: torch.Tensor, attack: PGD, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ε-ball around each image, clipped to [0, 1]: uniform per pixel (L∞), or a uniformly
    random direction at a radius uniform in [0, ε] (L2), as torchattacks starts."""
    if attack.norm == "linf":
        noise = torch.rand(clean.shape, generator=generator, device=clean.device) * (2 * attack.eps) - attack.eps
        return (clean + noise).clamp(0, 1)
    direction = torch.randn(clean.shape, generator=generator, device=clean.device)
    radius = torch.rand((*clean.shape[:2], 1, 1, 1), generator=generator, device=clean.device) * attack.eps
    return (clean + direction * radius / per_image_norms(direction)).clamp(0, 1)


def project(adversarial: torch.Tensor, clean: torch.Tensor, attack: PGD) -> torch.Tensor:
    """``adversarial`` moved back into the ε-ball around ``clean`` and into [0, 1]."""
    delta = adversarial - clean
    if attack.norm == "linf":
        delta = delta.clamp(-attack.eps, attack.eps)
    else:
        # a zero perturbation (ε = 0, or a gradient of exactly 0) stays zero, not 0 / 0
        delta = delta * torch.clamp_max(attack.eps / per_image_norms(delta).clamp_min(GRADIENT_FLOOR), 1.0)
    return (clean + delta).clamp(0, 1)


def pgd(
    net: nn.Module,
    clean: torch.Tensor,
    labels: torch.Tensor,
    attack: PGD,
    generator: torch.Generator | None = None,
    check: bool = False,
) -> torch.Tensor:
    """Every member's adversarial images: ``net`` maps ``[K, B, C, H, W]`` to ``[K, B, classes]`` (the members, in eval
    mode); ``clean`` ``[K, B, C, H, W]`` in [0, 1] and ``labels`` ``[K, B]``. ``check``: assert after every step that
    each image is within its ε-ball and in [0, 1] (the tests do)."""
    adversarial = random_start(clean, attack, generator) if attack.random_start else clean.clone()
    for _ in range(attack.steps):
        adversarial.requires_grad_(True)
        losses = member_losses(net(adversarial).float(), labels, attack.loss)
        (gradient,) = torch.autograd.grad(losses.mean(dim=1).sum(), adversarial)
        with torch.no_grad():
            linf = attack.norm == "linf"
            step = gradient.sign() if linf else gradient / (per_image_norms(gradient) + GRADIENT_FLOOR)
            adversarial = project(adversarial + attack.step_size * step, clean, attack)
        if check:
            assert_within(adversarial, clean, attack)
    return adversarial.detach()


def member_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """``[K, B]``: each member's ``loss`` on each of its images, from its logits ``[K, B, classes]``."""
    if loss == "ce":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    true = logits.gather(-1, labels[..., None])[..., 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), -math.inf)
    return others.amax(dim=-1) - true


def assert_within(adversarial: torch.Tensor, clean: torch.Tensor, attack: PGD) -> None:
    """Asserts that every adversarial image is in [0, 1] and within ε of its clean image (up to float rounding)."""
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    delta = adversarial - clean
    distance = delta.abs().flatten(2).amax(dim=2) if attack.norm == "linf" else delta.flatten(2).norm(p=2, dim=2)
    assert distance.max() <= attack.eps * (1 + 1e-5) + 1e-6, (distance.max().item(), attack.eps)


@torch.no_grad()
def correct(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K, B]``: whether each member classifies its own images right."""
    return net(images).argmax(dim=-1) == labels


def robust_accuracy(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: list[PGD],
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    check: bool = False,
) -> torch.Tensor:
    """``[len(attacks), K]``: each member's accuracy on ``images`` ``[n, C, H, W]`` (labels ``[n]``) under each attack,
    the images attacked ``batch_size`` at a time; ``net`` holds the K members (``[K, B, ...]`` -> ``[K, B, classes]``).
    """
    rows = [robust_correct(net, images, labels, a, batch_size, generator, check) for a in attacks]
    return torch.stack([row.double().mean(dim=1) for row in rows])


def robust_correct(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: PGD,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    check: bool = False,
) -> torch.Tensor:
    """``[K, n]``: whether each member classifies each of ``images`` right under ``attack`` (``robust_accuracy``)."""
    net.eval()
    members, rows = member_count(net), []
    for start in range(0, len(images), batch_size):
        chunk, chunk_labels = images[start : start + batch_size], labels[start : start + batch_size]
        clean = chunk.expand(members, *chunk.shape).contiguous()
        targets = chunk_labels.expand(members, len(chunk_labels))
        rows.append(correct(net, pgd(net, clean, targets, attack, generator, check), targets))
    return torch.cat(rows, dim=1)


def member_count(net: nn.Module) -> int:
    """How many members ``net`` holds (its ``k``, or its members' count)."""
    for module in net.modules():
        if hasattr(module, "k"):
            return module.k
        if hasattr(module, "members") and isinstance(module.members, nn.ModuleList):
            return len(module.members)
    raise ValueError(f"Expected a network of stacked or looped members, but got {type(net).__name__}")
