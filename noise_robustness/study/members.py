"""A study's members: one network per (corruption, severity, seed), computed once from the study's options."""

from dataclasses import dataclass
from decimal import Decimal

from noise_robustness.corruptions import GAUSSIAN, Corruption, build
from noise_robustness.data.noise import check_noise_scale


def sigma_text(sigma: float) -> str:
    """σ as short text that reads back as the same float: ``0.5``, ``4``, ``0.1234567`` (never two σ, one text)."""
    short = f"{sigma:g}"
    return short if float(short) == sigma else repr(sigma)


@dataclass(frozen=True)
class Member:
    """One network of the study, trained on ``corruption`` at severity ``noise_scale`` (in the corruption's unit;
    Gaussian noise's σ by default). ``seed`` seeds its weights, shuffle order, dropout and corruption patterns.
    Severity 0 is the clean member, whatever the corruption: one per seed."""

    noise_scale: float
    seed: int
    corruption: Corruption = GAUSSIAN

    def __post_init__(self):
        if self.noise_scale == 0 and self.corruption != GAUSSIAN:
            object.__setattr__(self, "corruption", GAUSSIAN)  # clean is clean: one member, named as it always was

    @property
    def key(self) -> str:
        """``sigma`` for Gaussian noise (and clean), else the corruption's name: what names its folder."""
        return "sigma" if self.corruption == GAUSSIAN else self.corruption.name

    @property
    def name(self) -> str:
        """``sigma=0.5/seed=0``, ``impulse=0.1/seed=0``: how files, results and messages name it."""
        return f"{self.key}={sigma_text(self.noise_scale)}/seed={self.seed}"


def network_name(network: type | str) -> str:
    """What tables, files and figures call a network: its class's name (``DropoutMLP``), from the class or its
    ``class_path``."""
    return network.rsplit(".", 1)[-1] if isinstance(network, str) else network.__name__


def scales_of(members: list[Member]) -> list[float]:
    """The σ values of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.noise_scale for m in members))


def seeds_of(members: list[Member]) -> list[int]:
    """The seeds of ``members``, each once, in the order they first appear."""
    return list(dict.fromkeys(m.seed for m in members))


def hparams_of(members: list[Member]) -> dict[Member, dict[str, object]]:
    """What tells each member apart, as a run's hyperparameters: σ and seed in a study of Gaussian noise; else what
    each trained on, at which severity (in its unit), and its seed."""
    if all(m.key == "sigma" for m in members):
        return {m: {"sigma": m.noise_scale, "seed": m.seed} for m in members}
    return {m: {"corruption": m.corruption.name, "severity": m.noise_scale, "seed": m.seed} for m in members}


def run_names(members: list[Member]) -> list[str]:
    """Each member's TensorBoard run, ``sigma=0.5/seed=0``, written so that they sort numerically as text.

    TensorBoard sorts runs as strings ("0.5/" before "0/", "1020" before "25.5"), so σ gets the
    study's widest integer part and most decimals ("sigma=0.0" ... "sigma=4.0"; "sigma=0025.5"),
    and seeds the widest seed.
    """
    decimals = max(-min(0, Decimal(sigma_text(m.noise_scale)).as_tuple().exponent) for m in members)
    sigmas = [f"{m.noise_scale:.{decimals}f}" for m in members]
    width = max(len(s) for s in sigmas)
    seed_width = max(len(str(m.seed)) for m in members)
    return [f"{m.key}={s.zfill(width)}/seed={m.seed:0{seed_width}d}" for s, m in zip(sigmas, members)]


def study_members(
    scales: list[float], seeds: list[int], corruptions: list | None = None, names: list[str] | None = None
) -> list[Member]:
    """Every (corruption, severity, seed) of the study, seed-major: members of one seed share a shuffle order and
    corruption patterns. Each corruption (``corruptions.build`` specs; default Gaussian noise alone) is trained at
    its own severities, else at ``scales``; severity 0 is one clean member per seed. ``names``: only the members
    named (``sigma=0.5/seed=0``, the ``members`` option), in the study's order.

    Raises:
        ValueError: an empty or repeated list, a corruption named twice, a severity outside its corruption's range,
            or a name that is not one of the members.
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
    trained = [Member(level, -1, c) for c in distinct(corruptions, "corruptions") for level in c.levels(scales)]
    grid = list(dict.fromkeys((m.noise_scale, m.corruption) for m in trained))  # clean once
    return chosen([Member(level, seed, corruption) for seed in seeds for level, corruption in grid], names)


def members_of(options: dict) -> list[Member]:
    """The members a resolved config (nested, as YAML writes it) trains: its ``scales``, ``seeds``, ``corruptions``
    and ``members``."""
    return study_members(options["scales"], options["seeds"], options.get("corruptions"), options.get("members"))


def chosen(members: list[Member], names: list[str] | None) -> list[Member]:
    """The ``members`` that ``names`` names, in the study's order; all of them for None."""
    if names is None:
        return members
    known = {m.name: m for m in members}
    unknown = [name for name in names if name not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"Expected `members` to name members of the study once each ({', '.join(known)}), but got {names}"
        )
    return [m for m in members if m.name in names]


def distinct(corruptions: list | None, option: str) -> list[Corruption]:
    """The corruptions of ``option`` built from their specs (default: Gaussian noise alone), each named once.

    Raises:
        ValueError: an unknown corruption or a bad severity (naming it), or one named twice.
    """
    try:
        built = [GAUSSIAN] if corruptions is None else [build(spec) for spec in corruptions]
    except ValueError as err:
        raise ValueError(f"{err} (in `{option}`)") from None
    names = [c.name for c in built]
    if not built or len(set(names)) != len(names):
        raise ValueError(f"Expected `{option}` to name each corruption once, but got {names}")
    return built


def evaluations(eval_corruptions: list | None, scales: list[float], members: list[Member]) -> list[tuple]:
    """The (corruption, severity) cells every member is evaluated at, each once: by default each of the members'
    training corruptions at its severities; with ``eval_corruptions``, clean first, then each of them at its
    severities (its own, else ``scales``).

    Raises:
        ValueError: an unknown corruption, one named twice, or a severity outside its range, naming the option.
    """
    if eval_corruptions is None:
        order = list(dict.fromkeys(m.corruption for m in members))
        cells = sorted({(m.corruption, m.noise_scale) for m in members}, key=lambda c: (order.index(c[0]), c[1]))
    else:
        built = distinct(eval_corruptions, "eval_corruptions")
        cells = [(GAUSSIAN, 0.0)] + [(c, s) for c in built for s in sorted(c.levels(scales))]
    as_members = [Member(severity, 0, corruption) for corruption, severity in cells]  # clean is Gaussian at 0
    return list(dict.fromkeys((m.corruption, m.noise_scale) for m in as_members))
