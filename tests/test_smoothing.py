"""Randomized smoothing (``certify/smoothing.py``) against independent references: scipy's binomial tail and normal
quantile, a linear base classifier whose smoothed radius is known in closed form, and repeated runs."""

import math

import pytest
import torch
from scipy import stats
from torch import nn

from noise_robustness.certify.smoothing import (
    ABSTAIN,
    Votes,
    certificate,
    certified_radius,
    lower_confidence_bound,
    predict_p_value,
)
from noise_robustness.engine.stacked import build_member, stack
from noise_robustness.models import DropoutMLP


@pytest.mark.parametrize(("successes", "trials"), [(1, 10), (5, 10), (99, 100), (990, 1000), (700, 1000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_the_lower_bound_is_the_probability_at_which_so_many_successes_have_probability_alpha(successes, trials, alpha):
    """Clopper–Pearson's definition: P(Binomial(n, p) >= k) = α at p = the bound (scipy's exact binomial tail)."""
    p = lower_confidence_bound(successes, trials, alpha)
    assert stats.binom.sf(successes - 1, trials, p) == pytest.approx(alpha, rel=1e-9)


@pytest.mark.parametrize("trials", [1, 100, 100_000])
def test_the_lower_bound_in_closed_form_at_all_and_no_successes(trials):
    assert lower_confidence_bound(trials, trials, 0.001) == pytest.approx(0.001 ** (1 / trials), rel=1e-12)
    assert lower_confidence_bound(0, trials, 0.001) == 0.0


@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.999, 1 - 1e-9])
def test_the_radius_is_sigma_times_the_normal_quantile(p):
    assert certified_radius(p, 0.25) == pytest.approx(0.25 * stats.norm.ppf(p), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("top", "runner_up"), [(10, 0), (60, 40), (51, 49), (600, 350), (0, 0)])
def test_predict_test_is_the_two_sided_binomial_p_value(top, runner_up):
    """Summed here from math.comb: twice the smaller tail at p = 1/2, at most 1."""
    total = top + runner_up
    if total == 0:
        assert predict_p_value(top, runner_up) == 1.0
        return
    tail = sum(math.comb(total, i) for i in range(min(top, runner_up) + 1)) / 2**total
    assert predict_p_value(top, runner_up) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_certificate_abstains_at_or_below_one_half_and_certifies_above():
    selection = torch.tensor([0, 0, 100, 0, 0, 0, 0, 0, 0, 0])
    certified = certificate(selection, torch.tensor([0, 0, 990, 10, 0, 0, 0, 0, 0, 0]), 0.001, 0.5)
    assert certified.prediction == certified.predict == certified.chosen == 2
    assert certified.radius == pytest.approx(0.5 * stats.norm.ppf(stats.beta.ppf(0.001, 990, 11)))
    doubtful = certificate(selection, torch.tensor([0, 0, 520, 480, 0, 0, 0, 0, 0, 0]), 0.001, 0.5)
    assert (doubtful.prediction, doubtful.predict, doubtful.radius, doubtful.chosen) == (ABSTAIN, ABSTAIN, 0.0, 2)


class Linear(nn.Sequential):
    """f(x) = 1 if w·x + b > 0 else 0, as logits of 10 classes (classes 2-9 never win)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__(nn.Flatten(), nn.Linear(784, 10))
        with torch.no_grad():
            self[1].weight.zero_()
            self[1].bias.fill_(-1e9)
            self[1].weight[0], self[1].weight[1] = -w, w
            self[1].bias[0], self[1].bias[1] = -b, b


def linear_case(seed: int) -> tuple[nn.Module, torch.Tensor, float]:
    """A random linear classifier and a random image; its smoothed classifier's exact radius |w·x + b| / ‖w‖."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(784, generator=g) / 28
    image = torch.rand(1, 28, 28, generator=g)
    margin = float(torch.rand((), generator=g)) * 1.5 * float(w.norm())  # true radius up to 1.5, σ = 0.5
    b = margin - float(w @ image.flatten())
    return Linear(w, b).eval(), image, abs(margin) / float(w.norm())


def certify_linear(seed: int, n: int, alpha: float, sigma: float = 0.5):
    net, image, exact = linear_case(seed)
    votes = Votes(stack([net], [0]), [seed], [sigma], clip=False, device=torch.device("cpu"))
    selection = votes.count(image, "test", seed, "selection", 100)[0]
    estimation = votes.count(image, "test", seed, "estimation", n)[0]
    return certificate(selection, estimation, alpha, sigma), exact


@pytest.mark.slow  # 3.5 s: the default tier's time
def test_certified_radii_of_a_linear_classifier_stay_below_its_exact_radius_and_approach_it_as_n_grows():
    """g's class is 1 (every margin here is > 0) and its exact robust radius |w·x + b| / ‖w‖. A certificate is
    false if it names class 0 or a larger radius: at most an α fraction of them, and here none."""
    alpha, trials = 0.05, 40
    shortfall = {}
    for n in (100, 1000, 10_000):
        false, gaps = 0, []
        for seed in range(trials):
            answer, exact = certify_linear(seed, n, alpha)
            false += answer.prediction == 0 or answer.radius > exact
            if answer.prediction == 1:
                gaps.append(exact - answer.radius)
        assert false <= stats.binom.ppf(0.999, trials, alpha), (n, false)
        shortfall[n] = sum(gaps) / len(gaps)
    assert shortfall[100] > shortfall[1000] > shortfall[10_000]
    assert shortfall[10_000] < 0.15  # σ = 0.5: at n = 10^4 the bound costs ~0.1 of radius


def test_predict_abstains_on_the_decision_boundary_and_certify_never_certifies_there():
    """At w·x + b = 0, P(f = 1) = 1/2 exactly: PREDICT may return a class in at most an α fraction of runs,
    CERTIFY (which needs p_A > 1/2) in at most an α fraction too."""
    alpha, trials = 0.05, 200
    answered = certified = 0
    for seed in range(trials):
        net, image, _ = linear_case(seed)
        w, b = net[1].weight[1], net[1].bias[1]
        with torch.no_grad():
            net[1].bias[1] = b - (w @ image.flatten() + b)  # move the boundary onto the image
            net[1].bias[0] = -net[1].bias[1]
        votes = Votes(stack([net], [0]), [seed], [0.5], clip=False, device=torch.device("cpu"))
        answer = certificate(
            votes.count(image, "test", seed, "selection", 100)[0],
            votes.count(image, "test", seed, "estimation", 200)[0],
            alpha,
            0.5,
        )
        answered += answer.predict != ABSTAIN
        certified += answer.prediction != ABSTAIN
    limit = stats.binom.ppf(0.999, trials, alpha)
    assert answered <= limit and certified <= limit, (answered, certified)


def test_members_counted_side_by_side_equal_members_counted_one_at_a_time():
    """Three MLPs of two seeds at three σ: the votes of each, stacked, equal its votes alone, bit for bit."""
    seeds, sigmas = [0, 1, 0], [0.25, 0.5, 1.0]
    nets = [build_member(DropoutMLP, seed).eval() for seed in seeds]
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    together = Votes(stack(nets, seeds).eval(), seeds, sigmas, False, torch.device("cpu"))
    alone = [
        Votes(stack([net], [s]).eval(), [s], [sigma], False, torch.device("cpu"))
        for net, s, sigma in zip(nets, seeds, sigmas)
    ]
    for samples in (100, 1100):
        votes = together.count(image, "test", 7, "estimation", samples)
        for k, member in enumerate(alone):
            assert torch.equal(votes[k], member.count(image, "test", 7, "estimation", samples)[0])
        assert votes.sum(dim=1).tolist() == [samples] * 3
