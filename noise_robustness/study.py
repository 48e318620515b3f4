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
        """``sigma=0.5/seed=0``: how results and messages name it."""
        return f"sigma={self.noise_scale:g}/seed={self.seed}"


def scales_of(members: list[Member]) -> list[float]:
    """The σ values of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.noise_scale for m in members))


def seeds_of(members: list[Member]) -> list[int]:
    """The seeds of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.seed for m in members))


def run_names(members: list[Member]) -> list[str]:
    """Each member's TensorBoard run, ``sigma=0.5/seed=0``, written so that they sort numerically as text.

    TensorBoard sorts runs as strings ("0.5/" before "0/", "1020" before "25.5"), so σ gets the
    study's widest integer part and most decimals ("sigma=0.0" ... "sigma=4.0"; "sigma=0025.5"),
    and seeds the widest seed.
    """
    decimals = max(len(f"{m.noise_scale:g}".partition(".")[2]) for m in members)
    sigmas = [f"{m.noise_scale:.{decimals}f}" for m in members]
    width = max(len(s) for s in sigmas)
    seed_width = max(len(str(m.seed)) for m in members)
    return [f"sigma={s.zfill(width)}/seed={m.seed:0{seed_width}d}" for s, m in zip(sigmas, members)]


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
