"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): PREDICT and CERTIFY, every member at once.

The smoothed classifier of a base classifier f at noise level σ is g(x) = argmax_c P(f(x + ε) = c),
ε ~ N(0, σ² I), with σ in units of the [0, 1] pixel range like the study's noise. CERTIFY guesses
g's class from n0 samples, counts how often f returns it among n fresh samples, and takes the
one-sided (1 − α) Clopper–Pearson lower bound p_A of its probability: if p_A > 1/2, g returns that
class at every x + δ with ‖δ‖₂ < σ Φ⁻¹(p_A) (with probability ≥ 1 − α over the samples), else it
abstains. PREDICT returns the top class of n samples when a two-sided binomial test says it beats
the runner-up at level α, else it abstains; here it reads CERTIFY's n estimation samples.

The noise is a pure function of (seed, MNIST file, image index, phase, sample index), drawn in
blocks of ``BLOCK`` samples, one generator each (as the training noise): a member's counts depend
neither on the other members, nor on which images are certified with it, nor on the device's
number of processes. Members of one seed share the standard-normal pattern, each scaled by its σ.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from scipy import stats

from noise_robustness.data.noise import add_noise, seeded

BLOCK = 500  # noise samples per generator and per forward pass: part of the draws' definition
ABSTAIN = -1  # the prediction of an abstention, as in Cohen et al.'s code


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """The one-sided (1 − α) Clopper–Pearson lower bound on a binomial probability (0 for no success)."""
    return 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """σ Φ⁻¹(p_A): the L2 radius within which the smoothed prediction cannot change."""
    return sigma * NormalDist().inv_cdf(p_lower) if p_lower < 1 else math.inf


def predict_p_value(top: int, runner_up: int) -> float:
    """PREDICT's test: the two-sided binomial p-value of ``top`` against ``runner_up`` at probability 1/2."""
    return float(stats.binomtest(top, top + runner_up, 0.5).pvalue) if top + runner_up else 1.0


@dataclass(frozen=True)
class Certificate:
    """One member's answer for one image."""

    predict: int  # PREDICT's class, or ABSTAIN
    chosen: int  # the class the n0 selection samples chose
    prediction: int  # CERTIFY's class (``chosen``, when certified), or ABSTAIN
    counts: tuple[int, ...]  # the n estimation samples' votes, per class
    p_lower: float  # the lower confidence bound on the selected class's probability
    radius: float  # σ Φ⁻¹(p_lower); 0 when CERTIFY abstains


def certificate(selection: torch.Tensor, estimation: torch.Tensor, alpha: float, sigma: float) -> Certificate:
    """CERTIFY and PREDICT from the votes of the n0 selection and n estimation samples (``[classes]`` each)."""
    chosen = int(selection.argmax())  # ties: the lowest class, as numpy's argmax in Cohen et al.'s code
    counts = tuple(int(c) for c in estimation)
    n = sum(counts)
    p_lower = lower_confidence_bound(counts[chosen], n, alpha)
    certified = p_lower > 0.5
    ranked = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    top, runner_up = counts[ranked[0]], counts[ranked[1]]
    return Certificate(
        predict=ranked[0] if predict_p_value(top, runner_up) <= alpha else ABSTAIN,
        chosen=chosen,
        prediction=chosen if certified else ABSTAIN,
        counts=counts,
        p_lower=p_lower,
        radius=certified_radius(p_lower, sigma) if certified else 0.0,
    )


def noise_block(
    seed: int, file: str, index: int, phase: str, block: int, device: torch.device, shape: tuple = (1, 28, 28)
) -> torch.Tensor:
    """Standard-normal samples ``block * BLOCK`` to ``(block + 1) * BLOCK - 1`` of image ``index`` (of ``shape``,
    ``[C, H, W]``) of a data ``file``, for ``phase`` "selection" or "estimation": ``[BLOCK, C, H, W]``."""
    return seeded(torch.randn, (BLOCK, *shape), "smoothing", seed, file, index, phase, block, device=device)


class Votes:
    """Counts each member's base-classifier votes on noisy copies of one image, every member in one pass.

    Args:
        net: the stacked members (``[K, B, C, H, W]`` -> ``[K, B, classes]``), in eval mode.
        seeds: each member's seed (its noise pattern).
        sigmas: each member's smoothing σ.
        clip: clip noisy pixels to [0, 1], as the study's base classifiers were trained.
        classes: the data's classes (10: MNIST's digits).
    """

    def __init__(
        self, net: torch.nn.Module, seeds: list[int], sigmas: list[float], clip: bool, device: torch.device,
        classes: int = 10,
    ):  # fmt: skip
        self.net, self.clip, self.device, self.classes = net, clip, device, classes
        self.seeds = list(dict.fromkeys(seeds))
        self.rows = torch.tensor([self.seeds.index(s) for s in seeds], device=device)
        self.sigmas = torch.tensor(sigmas, device=device).view(-1, 1, 1, 1, 1)

    @torch.no_grad()
    def count(self, image: torch.Tensor, file: str, index: int, phase: str, samples: int) -> torch.Tensor:
        """``[K, classes]`` votes of ``samples`` noisy copies of ``image`` (``[C, H, W]`` in [0, 1]; or
        ``[K, C, H, W]``, each member's own copy of validation image ``index``, e.g. attacked)."""
        votes = torch.zeros((len(self.rows), self.classes), dtype=torch.int64, device=self.device)
        images = image.expand(len(self.rows), *image.shape) if image.dim() == 3 else image
        for block in range(math.ceil(samples / BLOCK)):
            size = min(BLOCK, samples - block * BLOCK)
            shape = tuple(images.shape[1:])
            z = torch.stack([noise_block(s, file, index, phase, block, self.device, shape)[:size] for s in self.seeds])
            noisy = add_noise(images[:, None].expand(-1, size, -1, -1, -1), self.sigmas, z[self.rows], self.clip)
            predictions = self.net(noisy).argmax(dim=-1)
            votes += torch.nn.functional.one_hot(predictions, self.classes).sum(dim=1)
        return votes
