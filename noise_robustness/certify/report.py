"""A certification's report: certified accuracy against L2 radius, every study of the command side by side
(``summary.md``, ``certified_accuracy.png``), and each member's curve in its study's TensorBoard run."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.certify.smoothing import ABSTAIN, certified_radius, lower_confidence_bound
from noise_robustness.files import write_atomic
from noise_robustness.study.members import Member, sigma_text
from noise_robustness.study.text import mean_std, percent, say
from noise_robustness.training.run_logger import member_run

if TYPE_CHECKING:  # the report reads certifications; the certification calls the report
    from noise_robustness.certify.certification import Certification, Setting

RADIUS_STEP = 0.25  # the summary's radii: 0, 0.25, 0.5, ... up to the largest certified


def by_sigma(certification: Certification, rows: dict[Member, list[dict]]) -> dict[float, list[list[tuple]]]:
    """Training σ -> per seed, each image's (radius, certified and correct)."""
    curves: dict[float, list] = defaultdict(list)
    for member in certification.members:
        curves[member.noise_scale].append(radii_of(rows[member]))
    return dict(curves)


def radii_of(rows: list[dict]) -> list[tuple[float, bool]]:
    return [(float(r["radius"]), r["correct"] == "1") for r in rows]


def certified_accuracy(images: list[tuple[float, bool]], radius: float) -> float:
    """The share of images whose smoothed prediction is correct and certified at L2 radius >= ``radius``."""
    return sum(correct and r >= radius for r, correct in images) / len(images)


def write(certifications: list[Certification]) -> None:
    """``summary.md`` and ``certified_accuracy.png`` (every study of the command) in each certification folder,
    and each member's curve (step = radius × 100) and the figure in its study's TensorBoard."""
    by_network = gathered(certifications)
    text = summary_markdown(by_network)
    figure = certified_figure(by_network)
    for certification, rows in by_network.values():
        write_atomic(certification.folder / "summary.md", text)
        write_atomic(
            certification.folder / "certified_accuracy.png", lambda file: figure.savefig(file, format="png", dpi=120)
        )
        log_tensorboard(certification, rows, figure)
    say("certify", f"done: summary.md and certified_accuracy.png in {', '.join(str(c.folder) for c in certifications)}")


def gathered(certifications: list[Certification]) -> dict[str, tuple[Certification, dict[Member, list[dict]]]]:
    """Network -> (its certification, each member's rows, read once), networks in alphabetical order (whatever
    the command's)."""
    return {
        c.network: (c, {m: c.read_rows(m) for m in c.members}) for c in sorted(certifications, key=lambda c: c.network)
    }


def summary_radii(largest: float) -> list[float]:
    """The radii a summary reports: 0, ``RADIUS_STEP``, ... up to ``largest`` (the largest radius certified)."""
    return [RADIUS_STEP * i for i in range(int(largest / RADIUS_STEP) + 1)]


def largest_certified(by_network: dict) -> float:
    return max(float(r["radius"]) for _, rows in by_network.values() for member in rows.values() for r in member)


def summary_markdown(by_network: dict) -> str:
    """Per network, a row per training σ: certified accuracy at radii 0, 0.25, ... up to the largest certified
    (mean ± std over seeds), and how often CERTIFY and PREDICT abstained."""
    setting = next(iter(by_network.values()))[0].setting
    radii = summary_radii(largest_certified(by_network))
    smoothing = "each member's training σ" if setting.sigma is None else f"σ = {sigma_text(setting.sigma)}"
    lines = [
        f"## Certified accuracy (%) against L2 radius: randomized smoothing at {smoothing}",
        "",
        f"Cohen et al.'s CERTIFY with n0 = {setting.n0}, n = {setting.n}, α = {setting.alpha:g}, on {setting.images} "
        f"validation images (a fixed seeded subset). Certified accuracy at r: the share of the images whose "
        "smoothed prediction is correct and certified at radius ≥ r (an abstention counts as wrong); r in units "
        "of the [0, 1] pixel range, as σ. Mean ± std over seeds. With these n and α no radius beyond "
        f"{largest_radius(setting, 1.0):.2f} σ can be certified (p_A ≤ α^(1/n)); PREDICT reads the same n samples.",
        "",
    ]
    for network, (certification, rows) in by_network.items():
        seeds = sorted({m.seed for m in certification.members})
        lines += [
            f"### {network}, seeds {seeds}",
            "",
            f"| trained at σ | {' | '.join(f'r = {sigma_text(r)}' for r in radii)} | abstained | PREDICT abstained |",
            f"| ---: |{' ---: |' * (len(radii) + 2)}",
        ]
        for sigma, per_seed in sorted(by_sigma(certification, rows).items()):
            cells = [percent([certified_accuracy(images, r) for images in per_seed], 1) for r in radii]
            members = [m for m in certification.members if m.noise_scale == sigma]
            abstained = [statistics.fmean(int(r["prediction"]) == ABSTAIN for r in rows[m]) for m in members]
            predict_abstained = [statistics.fmean(int(r["predict"]) == ABSTAIN for r in rows[m]) for m in members]
            cells += [percent(abstained, 1), percent(predict_abstained, 1)]
            lines.append(f"| {sigma_text(sigma)} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def largest_radius(setting: Setting, sigma: float) -> float:
    """The largest radius CERTIFY can return: every one of the n samples votes for the class."""
    return certified_radius(lower_confidence_bound(setting.n, setting.n, setting.alpha), sigma)


def certified_figure(by_network: dict) -> Figure:
    """Certified accuracy against radius, a panel per network, a curve per training σ (mean over seeds, ± std)."""
    setting = next(iter(by_network.values()))[0].setting
    largest = largest_certified(by_network)
    fig = Figure(figsize=(5.5 * len(by_network), 4.2))
    axes = fig.subplots(1, len(by_network), squeeze=False)[0]
    grid = [largest * i / 400 for i in range(401)]
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for ax, (network, (certification, rows)) in zip(axes, by_network.items()):
        for colour, (sigma, per_seed) in zip(colours, sorted(by_sigma(certification, rows).items())):
            stats = [mean_std([100 * certified_accuracy(images, r) for images in per_seed]) for r in grid]
            ax.plot(grid, [m for m, _ in stats], color=colour, label=f"trained at σ = {sigma_text(sigma)}")
            if setting.sigma is None:  # each smoothed at its own σ: where its n samples stop certifying
                ax.axvline(largest_radius(setting, sigma), color=colour, lw=0.8, ls=":")
            ax.fill_between(grid, [m - s for m, s in stats], [m + s for m, s in stats], color=colour, alpha=0.2)
        ax.set(xlabel="L2 radius (units of the [0, 1] pixel range)", ylabel="certified accuracy (%)", ylim=(0, 101),
               title=f"{network}: randomized smoothing")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    smoothing = "each at its training σ" if setting.sigma is None else f"at σ = {sigma_text(setting.sigma)}"
    fig.suptitle(
        f"Smoothed {smoothing}; n0 = {setting.n0}, n = {setting.n}, α = {setting.alpha:g}, {setting.images} "
        "validation images;\nmean ± std over seeds (dotted: the largest radius n samples can certify)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def log_tensorboard(certification: Certification, rows: dict[Member, list[dict]], figure: Figure) -> None:
    """Each member's certified accuracy against radius (step = radius × 100) in its run, the figure at the root."""
    study = certification.study
    tag = f"certify/{certification.setting.name}"
    for member in certification.members:
        images = radii_of(rows[member])
        writer = SummaryWriter(str(member_run(study.out / "tensorboard", member, study.members)))
        largest = max(r for r, _ in images)
        for step in range(int(100 * largest) + 1):
            writer.add_scalar(f"{tag}/certified_acc", certified_accuracy(images, step / 100), step)
        writer.close()
    writer = SummaryWriter(str(study.out / "tensorboard"))
    writer.add_figure(tag, figure)
    writer.close()
