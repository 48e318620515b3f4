"""An attack's report: accuracy under PGD against ε per training σ, its area, and SmoothAdv beside the certified
accuracy (``summary.md``, ``robust_accuracy.png``; the figure also goes to the study's TensorBoard)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.files import write_atomic
from noise_robustness.study.members import sigma_text
from noise_robustness.study.text import mean_std, percent, say

if TYPE_CHECKING:  # the report reads an attack; the attack calls the report
    from noise_robustness.attacks.attack import Attack

NORMS = {"linf": "L∞", "l2": "L2"}


LOSS_TEXT = {"ce": "the cross-entropy (Madry et al.'s, torchattacks')", "margin": "Carlini & Wagner's margin"}
LOSS_NAMES = {"worst": "every loss", "ce": "the cross-entropy alone", "margin": "the margin alone"}


def trained_label(corruption: str, severity: float) -> str:
    """``σ = 0.5`` for Gaussian noise, ``impulse 0.1`` for another corruption."""
    return f"σ = {sigma_text(severity)}" if corruption == "gaussian" else f"{corruption} {sigma_text(severity)}"


def curves(rows: list[dict], epsilons: dict[str, list[float]], loss: str = "worst") -> dict:
    """(network, training corruption, severity) -> norm -> per seed, the accuracy at ε = 0 (clean) and at each of the
    norm's ``epsilons`` (in order), under ``loss``'s attack (``worst``: an image counts if no loss's attack flipped
    it)."""
    by_member: dict = defaultdict(dict)
    for r in rows:
        if r["loss"] not in (loss, "none"):
            continue
        by_member[r["network"], r["corruption"], float(r["noise_scale"]), int(r["seed"])][
            r["norm"], float(r["eps"])
        ] = float(r["acc"])
    table: dict = defaultdict(lambda: defaultdict(list))
    for (network, corruption, severity, _), accuracy in sorted(by_member.items(), key=lambda item: item[0][3]):
        for norm, levels in epsilons.items():
            table[network, corruption, severity][norm].append(
                [accuracy["none", 0.0], *(accuracy[norm, float(e)] for e in levels)]
            )
    return table


def area(levels: list[float], accuracy: list[float]) -> float:
    """The mean accuracy from ε = 0 to the largest ε (trapezoids from the clean accuracy): one number per curve (the
    clean accuracy when every ε is 0)."""
    points = list(zip([0.0, *levels], accuracy))
    if points[-1][0] == 0:
        return accuracy[0]
    return sum((e1 - e0) * (a0 + a1) / 2 for (e0, a0), (e1, a1) in zip(points, points[1:])) / points[-1][0]


def written_epsilons(rows: list[dict]) -> dict[str, list[float]]:
    """Norm -> every ε ``accuracy.csv`` holds for it, in order: this command's and those of earlier ones."""
    epsilons = {norm: sorted({float(r["eps"]) for r in rows if r["norm"] == norm}) for norm in NORMS}
    return {norm: levels for norm, levels in epsilons.items() if levels}


def summary_markdown(attack: Attack, rows: list[dict], smoothadv: list[dict]) -> str:
    """Per network, a row per training σ (or corruption): clean accuracy, accuracy under each attack and each norm's
    area, mean ± std over seeds (%); then SmoothAdv against the certified accuracy, if the study was certified."""
    setting = attack.setting
    epsilons = written_epsilons(rows)
    l2_step = "2.5 ε / steps" if setting.l2_step is None else f"{setting.l2_step:g}"
    lines = [
        "## Accuracy (%) under PGD: every member, L∞ and L2",
        "",
        f"Madry et al.'s PGD on {setting.images} validation images (the first of `certify`'s seeded order), "
        f"{setting.steps} steps of {setting.linf_step:g} (L∞) and {l2_step} (L2), "
        f"{'from a random start' if setting.random_start else 'from the clean image'}, in fp32, climbing "
        f"{' and '.join(LOSS_TEXT[loss] for loss in setting.losses)}, every member attacked through its own loss; "
        "ε in units of the [0, 1] pixel range, as σ. AUC: the mean accuracy from ε = 0 to the "
        "largest ε (trapezoids). Mean ± std over seeds.",
        "",
    ]
    losses = ["worst", *setting.losses] if len(setting.losses) > 1 else ["worst"]
    for loss in losses:
        lines += accuracy_tables(curves(rows, epsilons, loss), epsilons, loss, setting.losses)
    if smoothadv:
        lines += smoothadv_markdown(attack, smoothadv)
    return "\n".join(lines)


def accuracy_tables(table: dict, epsilons: dict[str, list[float]], loss: str, losses: tuple[str, ...]) -> list[str]:
    """Per network, a row per training σ: clean accuracy, accuracy under each attack and each norm's AUC."""
    lines = []
    for network in dict.fromkeys(n for n, _, _ in table):
        header = ["clean"]
        for norm, levels in epsilons.items():
            header += [f"{NORMS[norm]} {sigma_text(e)}" for e in levels] + [f"{NORMS[norm]} AUC"]
        title = f"PGD with {LOSS_NAMES[loss]}" if loss != "worst" or len(losses) > 1 else f"PGD with the {losses[0]}"
        if loss == "worst" and len(losses) > 1:
            title += f" ({' and '.join(losses)}: an image counts as robust if no attack flipped it)"
        lines += [f"### {network}: {title}", "", f"| trained on | {' | '.join(header)} |",
                  f"| ---: |{' ---: |' * len(header)}"]  # fmt: skip
        for (_, corruption, severity), by_norm in table.items():
            first = next(iter(by_norm.values()))
            cells = [percent([seed[0] for seed in first], 1)]
            for norm, levels in epsilons.items():
                per_seed = by_norm[norm]
                cells += [percent([seed[i + 1] for seed in per_seed], 1) for i in range(len(levels))]
                cells.append(percent([area(levels, seed) for seed in per_seed], 1))
            lines.append(f"| {trained_label(corruption, severity)} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def smoothadv_markdown(attack: Attack, rows: list[dict]) -> list[str]:
    """Per certification and training σ: certified accuracy at each radius r beside the smoothed classifier's accuracy
    under SmoothAdv at ε = r, and whether the certified never exceeds the empirical for any member."""
    setting = attack.setting
    lines = [
        "## Certified against empirical: SmoothAdv on the certified images",
        "",
        f"Salman et al.'s SmoothAdv (PGD L2 on the smoothed classifier, {setting.smoothadv_steps} steps of "
        f"2 ε / steps, {setting.smoothadv_samples} noise samples per step), the attacked image then classified by "
        "the majority of the certification's n noise samples. Certified accuracy at r (CERTIFY: a lower bound on "
        "the accuracy under any perturbation of norm < r) must not exceed the accuracy under an attack at ε = r (an "
        "upper bound): `holds` says whether it does for every member, strictly (a violation within sampling noise "
        "shows too, to be looked at). Each cell: certified / under attack (%), mean "
        "over seeds.",
        "",
    ]
    for certification in dict.fromkeys(r["certification"] for r in rows):
        mine = [r for r in rows if r["certification"] == certification]
        radii = sorted({float(r["radius"]) for r in mine})
        lines += [f"### {mine[0]['network']}, `certify/{certification}`", ""]
        lines.append(f"| trained at σ | {' | '.join(f'r = {sigma_text(r)}' for r in radii)} | holds |")
        lines.append(f"| ---: |{' ---: |' * (len(radii) + 1)}")
        for sigma in sorted({float(r["noise_scale"]) for r in mine}):
            cells, holds = [], True
            for radius in radii:
                at = [r for r in mine if float(r["noise_scale"]) == sigma and float(r["radius"]) == radius]
                certified = statistics.fmean(100 * float(r["certified_acc"]) for r in at)
                attacked = statistics.fmean(100 * float(r["smoothadv_acc"]) for r in at)
                holds &= all(float(r["certified_acc"]) <= float(r["smoothadv_acc"]) for r in at)
                cells.append(f"{certified:.1f} / {attacked:.1f}")
            lines.append(f"| {sigma_text(sigma)} | {' | '.join(cells)} | {'yes' if holds else '**no**'} |")
        lines.append("")
    return lines


def robust_figure(attack: Attack, rows: list[dict]) -> Figure:
    """Accuracy against ε, an L∞ and an L2 panel per network, a curve per training σ (mean over seeds, ± std)."""
    setting = attack.setting
    epsilons = written_epsilons(rows)
    table = curves(rows, epsilons)
    cross_entropy = curves(rows, epsilons, "ce") if len(setting.losses) > 1 and "ce" in setting.losses else {}
    networks = list(dict.fromkeys(n for n, _, _ in table))
    fig = Figure(figsize=(5 * len(epsilons), 4 * len(networks)))
    axes = fig.subplots(len(networks), len(epsilons), squeeze=False)
    colours = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
    for row, network in zip(axes, networks):
        for ax, (norm, levels) in zip(row, epsilons.items()):
            for colour, ((_, corruption, severity), by_norm) in zip(
                colours * 4, [(key, value) for key, value in table.items() if key[0] == network]
            ):
                stats = [mean_std([100 * seed[i] for seed in by_norm[norm]]) for i in range(len(levels) + 1)]
                grid = [0.0, *levels]
                name = f"trained at {trained_label(corruption, severity)}"
                ax.plot(grid, [m for m, _ in stats], marker="o", ms=3, color=colour, label=name)
                ax.fill_between(grid, [m - s for m, s in stats], [m + s for m, s in stats], color=colour, alpha=0.2)
                if (network, corruption, severity) in cross_entropy:  # what the cross-entropy alone leaves
                    ce = cross_entropy[network, corruption, severity][norm]
                    means = [statistics.fmean(100 * seed[i] for seed in ce) for i in range(len(levels) + 1)]
                    ax.plot(grid, means, color=colour, ls="--", lw=0.8)
            ax.set(xlabel=f"{NORMS[norm]} ε (units of the [0, 1] pixel range)", ylabel="accuracy under PGD (%)",
                   ylim=(0, 101), title=f"{network}: PGD {NORMS[norm]}, {setting.steps} steps")  # fmt: skip
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    dashed = "; dashed: the cross-entropy's attack alone" if cross_entropy else ""
    fig.suptitle(f"{setting.images} validation images; mean ± std over seeds{dashed}", fontsize=9)
    fig.tight_layout()
    return fig


def write(attack: Attack) -> None:
    """``summary.md`` and ``robust_accuracy.png`` in the attack's folder, the figure in the study's TensorBoard."""
    rows, smoothadv = attack.read("accuracy.csv"), attack.read("smoothadv.csv")
    write_atomic(attack.folder / "summary.md", summary_markdown(attack, rows, smoothadv))
    figure = robust_figure(attack, rows)
    write_atomic(attack.folder / "robust_accuracy.png", lambda file: figure.savefig(file, format="png", dpi=120))
    writer = SummaryWriter(str(attack.study.out / "tensorboard"))
    writer.add_figure(f"attack/{attack.setting.name}", figure)
    writer.close()
    say("attack", f"done: summary.md and robust_accuracy.png in {attack.folder}")
