"""SmoothAdv (Salman et al., NeurIPS 2019): PGD under L2 against the *smoothed* classifier of every member at once.

The smoothed classifier of member k at noise level σ_k returns the class its base network gives most often under
Gaussian noise (``certify/smoothing.py``). Its soft version's loss at x' is
−log((1/m) Σ_i softmax(f_k(x' + σ_k z_i))_y), m noise samples z_i drawn once and kept for every step (as Salman et
al.'s code draws them); each step moves x' by 2ε / steps along the loss gradient's per-image unit vector (their step
size), back onto the ε-ball and into [0, 1] (``pgd.project``). The attacked smoothed classifier is then read by its
estimate: the class most of n fresh noise samples vote for (``Votes.count``; no abstention).

Certified accuracy at radius r (CERTIFY: a lower bound on the smoothed classifier's accuracy under any perturbation
of norm < r, at confidence 1 − α) cannot exceed its empirical accuracy under an attack at ε = r (an upper bound): a
violation beyond sampling noise is a bug in one of them (``attacks/attack.py`` reports the check).
"""

import torch
from torch.nn import functional as F

from noise_robustness.attacks.pgd import GRADIENT_FLOOR, PGD, per_image_norms, project
from noise_robustness.data.noise import add_noise


def smoothadv(
    net: torch.nn.Module,
    clean: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    sigmas: torch.Tensor,
    z: torch.Tensor,
    clip: bool = False,
) -> torch.Tensor:
    """Every member's adversarial images against its smoothed classifier: ``net`` maps ``[K, B', C, H, W]`` to
    ``[K, B', classes]``; ``clean`` ``[K, B, C, H, W]`` in [0, 1], ``labels`` ``[K, B]``, ``sigmas`` ``[K]`` (each
    member's smoothing σ), ``z`` ``[K, m, B, C, H, W]`` standard-normal noise (m samples per image); ``clip``: clip
    the noisy images to [0, 1], as the members were trained."""
    members, samples, batch = z.shape[:3]
    if eps == 0:
        return clean
    ball = PGD("l2", eps, steps, 2 * eps / steps)
    scale = sigmas.view(members, 1, 1, 1, 1, 1).to(clean)
    adversarial = clean.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        noisy = add_noise(adversarial[:, None].expand_as(z), scale, z, clip).flatten(1, 2)  # [K, m·B, C, H, W]
        logits = net(noisy).float().view(members, samples, batch, -1)
        mean_probability = logits.softmax(dim=-1).mean(dim=1)  # [K, B, classes]
        losses = F.nll_loss(
            mean_probability.clamp_min(1e-20).log().flatten(0, 1), labels.flatten(), reduction="none"
        ).view(labels.shape)
        (gradient,) = torch.autograd.grad(losses.mean(dim=1).sum(), adversarial)
        with torch.no_grad():
            step = gradient / (per_image_norms(gradient) + GRADIENT_FLOOR)
            adversarial = project(adversarial + ball.step_size * step, clean, ball)
    return adversarial.detach()
