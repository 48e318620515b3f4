"""The members of a study: one network per (noise level σ, seed), trained side by side in one model."""

from dataclasses import dataclass

from noise_robustness.noise import check_noise_scale


@dataclass(frozen=True)
class Member:
    """One network of the study. ``seed`` seeds its weights, shuffle order, dropout and noise draw."""

    noise_scale: float
    seed: int

    @property
    def name(self) -> str:
        """``sigma=0.5/seed=0``: its TensorBoard run, sorting by σ then seed."""
        return f"sigma={self.noise_scale:g}/seed={self.seed}"


def study_members(scales: list[float], seeds: list[int]) -> list[Member]:
    """Every (σ, seed) of the study, seed-major: members of one seed share a shuffle order and noise pattern.

    Raises:
        ValueError: an empty or repeated list, or a σ that is not a finite number >= 0.
    """
    if not scales:
        raise ValueError("Expected `scales` to be a non-empty list of noise levels, but got []")
    if not seeds:
        raise ValueError("Expected `seeds` to be a non-empty list of integers, but got []")
    scales = [check_noise_scale(s, "scales") for s in scales]
    for name, values in (("scales", scales), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"Expected `{name}` to hold each value once, but got {values}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected `seeds` to be integers >= 0, but got {seed!r}")
    return [Member(scale, seed) for seed in seeds for scale in scales]
