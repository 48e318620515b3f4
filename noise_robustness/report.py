"""A study's report: ``summary.md``, ``accuracy_vs_noise.png``, ``noise_preview.png``, ``robustness.png``."""

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure  # a Figure of its own needs no pyplot and no display backend
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.corruptions import GAUSSIAN
from noise_robustness.study import Member, sigma_text

PREVIEW_DIGITS = 10  # the first validation image of each digit 0-9: a fixed choice


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def trained_on(row: dict, prefix: str = "") -> tuple[str, float]:
    """The (corruption, severity) a result or robustness row names (``prefix`` ``train_`` or ``eval_``)."""
    return row.get(f"{prefix}corruption", GAUSSIAN.name), float(row[f"{prefix}noise_scale"])


def label(cell: tuple[str, float], gaussian_only: bool) -> str:
    """``0.5`` and ``0 (clean)`` (Gaussian σ, in a study of Gaussian noise alone), ``gaussian 0.5``, ``impulse 0.1``,
    ``clean``."""
    corruption, severity = cell
    if gaussian_only:
        return f"{sigma_text(severity)}{' (clean)' if severity == 0 else ''}"
    return "clean" if severity == 0 else f"{corruption} {sigma_text(severity)}"


def cell_order(cells) -> list[tuple[str, float]]:
    """``cells`` (an iterable in a fixed order), each once: clean first, then Gaussian noise by σ, then each other
    corruption (in order of first appearance) by severity."""
    cells = list(dict.fromkeys(cells))
    corruptions = list(dict.fromkeys([GAUSSIAN.name, *(c for c, _ in cells)]))
    return sorted(cells, key=lambda cell: (cell[1] > 0, corruptions.index(cell[0]), cell[1]))


def aggregate(results: list[dict]) -> dict[str, dict[tuple[str, float], dict[str, list[float]]]]:
    """network (in the order of ``results``) -> (corruption, severity) -> {"train_acc": [per seed], "val_acc": [...],
    "gap": [...]}."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in results:
        cell = table[row["network"]][trained_on(row)]
        train, val = float(row["train_acc"]), float(row["val_acc"])
        cell["train_acc"].append(train)
        cell["val_acc"].append(val)
        cell["gap"].append(train - val)
    return table


def _fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def only_gaussian(cells) -> bool:
    return all(corruption == GAUSSIAN.name for corruption, _ in cells)


def side_by_side(table: dict) -> list[str]:
    """Validation accuracy (%) of every network at every σ, one column per network."""
    networks = list(table)
    cells = cell_order(cell for by_cell in table.values() for cell in by_cell)
    gaussian = only_gaussian(cells)
    lines = [
        "### Validation accuracy (%) by network",
        "",
        f"| {'σ' if gaussian else 'trained on'} | {' | '.join(networks)} |",
        f"| ---: |{' ---: |' * len(networks)}",
    ]
    for cell in cells:
        values = [_fmt(table[n][cell]["val_acc"]) if cell in table[n] else "" for n in networks]
        lines.append(f"| {label(cell, gaussian)} | {' | '.join(values)} |")
    return [*lines, ""]


def recipe_note(identity: dict) -> str | None:
    """How a study's members were trained, where that is not the first recipe (fp32, per-member dropout masks,
    eager step passes: every study made before these options): a line for its summary, naming the precision
    whenever it names anything, or None."""
    precision = identity.get("trainer.precision") or "32-true"  # null: Lightning's default
    choices = []
    if identity.get("model.dropout_masks", "per_member") != "per_member":
        choices.append(f"dropout masks {identity['model.dropout_masks']}")
    if identity.get("model.compiled"):
        choices.append("compiled step (torch.compile)")
    if precision in ("32-true", "32") and not choices:
        return None
    return f"Trained with {', '.join([f'precision {precision}', *choices])} (this study's own members)."


def summary_markdown(results: list[dict], robustness: list[dict] | None = None, recipe: str | None = None) -> str:
    """One table per network: rows = σ (clean first), train and validation accuracy (%) and their gap.

    ``recipe`` (``recipe_note``), when given, comes first.

    With several networks, a table of their validation accuracy side by side comes first. With any corruption
    but Gaussian noise (trained or evaluated), the corruption summary of ``robustness`` follows
    (``corruption_summary``).
    """
    table = aggregate(results)
    lines = [recipe, ""] if recipe else []
    lines += side_by_side(table) if len(table) > 1 else []
    for network, by_cell in table.items():
        rows = [r for r in results if r["network"] == network]
        seeds = sorted({int(r["seed"]) for r in rows})
        settings = ", ".join(
            f"{key} {', '.join(sorted({str(r[key]) for r in rows}))}" for key in ("epochs", "noise_mode", "clip")
        )
        spread = f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
        gaussian = only_gaussian(by_cell)
        lines += [
            f"### {network}: {settings}, seeds {seeds}{spread}",
            "",
            f"| {'σ' if gaussian else 'trained on'} | train acc (%) | val acc (%) | train − val (points) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for cell in cell_order(by_cell):
            values = by_cell[cell]
            lines.append(
                f"| {label(cell, gaussian)} | {_fmt(values['train_acc'])} | {_fmt(values['val_acc'])} | "
                f"{_fmt(values['gap'])} |"
            )
        lines.append("")
    if robustness and corrupted(results, robustness):
        lines += corruption_summary(robustness)
    return "\n".join(lines)


def corrupted(results: list[dict], robustness: list[dict]) -> bool:
    """Whether any member trained, or was evaluated, on another corruption than Gaussian noise: what adds the
    corruption summary to ``summary.md``."""
    return not only_gaussian([trained_on(r) for r in results] + [trained_on(r, "eval_") for r in robustness])


CLEAN = (GAUSSIAN.name, 0.0)
AUC_NOTE = (
    "clean: the accuracy on clean validation images. Each corruption: the mean accuracy from severity 0 to the "
    "largest evaluated (trapezoids from the clean accuracy); mean: their mean over the corruptions."
)
CE_NOTE = (
    "Each: the member's errors summed over the corruption's severities, over those of the clean-trained member of "
    "the same network and seed (the baseline: 100 %); mCE: their mean over the corruptions."
)


def area_under_accuracy(accuracy: dict, levels: list[float], corruption: str) -> float | None:
    """The mean of accuracy against severity over [0, the top level], by trapezoids from the clean accuracy.
    ``accuracy``: (corruption, severity) -> accuracy of one member; None if a cell is missing."""
    points = [(0.0, accuracy.get(CLEAN))] + [(s, accuracy.get((corruption, s))) for s in levels]
    if any(a is None for _, a in points):
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    return area / points[-1][0]


def corruption_error(accuracy: dict, baseline: dict, levels: list[float], corruption: str) -> float | None:
    """ImageNet-C's corruption error: the member's errors summed over ``levels``, over the baseline member's."""
    errors = [accuracy.get((corruption, s)) for s in levels]
    base = [baseline.get((corruption, s)) for s in levels]
    if None in errors + base or sum(1 - a for a in base) == 0:
        return None
    return sum(1 - a for a in errors) / sum(1 - a for a in base)


@dataclass
class CorruptionMeasures:
    """One network's summary numbers: per training cell, per seed, one value per evaluated corruption (None where
    a cell is missing); the mean over corruptions is taken per seed."""

    seeds: list[int]
    trained: list[tuple[str, float]]
    corruptions: list[str]
    levels: dict[str, list[float]]
    clean: dict[tuple, list[float]]  # training cell -> per seed: the accuracy on clean images
    auc: dict[tuple, list[list[float | None]]]  # training cell -> per seed -> per corruption
    ce: dict[tuple, list[list[float | None]]]

    def columns(self, measure: str, train: tuple) -> list[list[float]]:
        """Per corruption, then the mean over corruptions: the values over seeds (missing ones left out)."""
        per_seed = getattr(self, measure)[train]
        columns = [[v[i] for v in per_seed if v[i] is not None] for i in range(len(self.corruptions))]
        return [*columns, [statistics.fmean(v) for v in per_seed if None not in v]]


def corruption_measures(robustness: list[dict]) -> dict[str, CorruptionMeasures]:
    """Per network with any corruption evaluated above severity 0: the area under accuracy against severity and
    the corruption error relative to the clean-trained member of the same seed, of every training cell."""
    measures = {}
    for network in dict.fromkeys(r["network"] for r in robustness):
        accuracy = defaultdict(dict)  # (seed, training cell) -> evaluation cell -> accuracy
        for r in robustness:
            if r["network"] == network:
                accuracy[int(r["seed"]), trained_on(r, "train_")][trained_on(r, "eval_")] = float(r["acc"])
        seeds = sorted({seed for seed, _ in accuracy})
        trained = cell_order(train for _, train in accuracy)
        evaluated = cell_order(cell for cells in accuracy.values() for cell in cells if cell[1] > 0)
        corruptions = list(dict.fromkeys(c for c, _ in evaluated))
        levels = {c: [s for e, s in evaluated if e == c] for c in corruptions}
        if not corruptions:
            continue
        clean, auc, ce = {}, {}, {}
        for train in trained:
            mine = [accuracy.get((seed, train), {}) for seed in seeds]
            baseline = [accuracy.get((seed, CLEAN), {}) for seed in seeds]
            clean[train] = [a[CLEAN] for a in mine if CLEAN in a]
            auc[train] = [[area_under_accuracy(a, levels[c], c) for c in corruptions] for a in mine]
            ce[train] = [[corruption_error(a, b, levels[c], c) for c in corruptions] for a, b in zip(mine, baseline)]
        measures[network] = CorruptionMeasures(seeds, trained, corruptions, levels, clean, auc, ce)
    return measures


def corruption_summary(robustness: list[dict]) -> list[str]:
    """Per network, one row per training (corruption, severity): for each evaluated corruption, the area under
    accuracy against severity (%) and the corruption error relative to the clean-trained member of the same seed
    (%), with their means over the corruptions (mCE), mean ± std over seeds (docs/corruptions.md)."""
    lines = []
    for network, m in corruption_measures(robustness).items():
        spread = f"mean ± std over seeds {m.seeds}" if len(m.seeds) > 1 else f"seed {m.seeds[0]}"
        header = " | ".join(f"{c} ({', '.join(sigma_text(s) for s in m.levels[c])})" for c in m.corruptions)
        for title, measure, first, mean_name, note in (
            ("area under accuracy against severity (%)", "auc", "clean | ", "mean", AUC_NOTE),
            ("corruption error (%), relative to the clean-trained member", "ce", "", "mCE", CE_NOTE),
        ):
            lines += [f"### {network}: {title}, {spread}", "", note, ""]
            lines.append(f"| trained on | {first}{header} | {mean_name} |")
            lines.append(f"| --- |{' ---: |' * (len(m.corruptions) + 1 + bool(first))}")
            for train in m.trained:
                columns = ([m.clean[train]] if first else []) + m.columns(measure, train)
                values = [_fmt(column) if column else "" for column in columns]
                lines.append(f"| {label(train, False)} | {' | '.join(values)} |")
            lines.append("")
    return lines


def corruption_error_figure(measures: dict[str, CorruptionMeasures]) -> Figure:
    """Per network, a heatmap of the corruption error (%, mean over seeds): rows = what the member trained on,
    columns = the evaluated corruptions and their mean (mCE); below 100 (blue): fewer errors than the clean-trained
    member, above (red): more."""
    columns = len(next(iter(measures.values())).corruptions) + 1
    fig = Figure(figsize=(0.62 * columns + 3.5, 4.3 * len(measures) + 0.5), layout="constrained")
    axes = fig.subplots(len(measures), 1, squeeze=False)[:, 0]
    for ax, (network, m) in zip(axes, measures.items()):
        grid = [
            [100 * statistics.fmean(v) if v else float("nan") for v in m.columns("ce", train)] for train in m.trained
        ]
        image = ax.imshow(grid, cmap="RdBu_r", vmin=0, vmax=200, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                far = abs(value - 100) > 60  # a dark cell: white text
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if far else "black")
        ax.axvline(len(m.corruptions) - 0.5, color="black", lw=1)
        ax.set_xticks(range(len(m.corruptions) + 1), [*m.corruptions, "mCE"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.trained)), [label(t, False) for t in m.trained], fontsize=8)
        seeds = f"mean over seeds {m.seeds}" if len(m.seeds) > 1 else f"seed {m.seeds[0]}"
        ax.set(xlabel="evaluated on (each at its severities)", ylabel="trained on", title=f"{network}, {seeds}")
    fig.colorbar(image, ax=axes.tolist(), label="corruption error (%), clean-trained member = 100", shrink=0.8)
    fig.suptitle("Corruption error of each member, relative to the clean-trained member of its network", fontsize=10)
    return fig


def _shaded(ax, scales: list[float], per_seed: list[list[float]], style: str, colour: str, label: str) -> None:
    """A line through the means over seeds at each σ, with ± one std shaded."""
    stats = [mean_std(values) for values in per_seed]
    ax.plot(scales, [m for m, _ in stats], style, marker="o", color=colour, label=label)
    ax.fill_between(scales, [m - s for m, s in stats], [m + s for m, s in stats], color=colour, alpha=0.15)


def accuracy_figure(results: list[dict], majority: float) -> Figure:
    """Left: train (dashed) and validation (solid) accuracy against σ; right: their gap. One colour per
    network, mean over seeds, ± std shaded.

    ``majority``: the share of the commonest digit among the validation labels, what a network that
    always answers it scores.
    """
    fig = Figure(figsize=(11, 4.5))
    accuracy, gap = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    results = [r for r in results if trained_on(r)[0] == GAUSSIAN.name]  # σ is Gaussian noise's
    for colour, (network, by_cell) in zip(colours, aggregate(results).items()):
        by_scale = {severity: values for (_, severity), values in by_cell.items()}
        scales = sorted(by_scale)
        for split, style in (("train_acc", "--"), ("val_acc", "-")):
            _shaded(
                accuracy,
                scales,
                [[100 * v for v in by_scale[s][split]] for s in scales],
                style,
                colour,
                f"{network} {split.split('_')[0]}",
            )
        _shaded(gap, scales, [[100 * v for v in by_scale[s]["gap"]] for s in scales], "-", colour, network)
    all_scales = sorted({float(r["noise_scale"]) for r in results})
    noisy = [s for s in all_scales if s > 0]
    for ax in (accuracy, gap):
        # linear up to the smallest noisy σ, logarithmic above: σ = 0 and 0.1 ... 4 (or 255 x that) alike
        ax.set_xscale("symlog", linthresh=noisy[0] if noisy else 1.0, linscale=0.5)
        ax.set_xticks(all_scales, [sigma_text(s) for s in all_scales])
        ax.tick_params(axis="x", labelsize=8)
        ax.minorticks_off()
        ax.set_xlabel("noise std σ (units of the [0, 1] pixel range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    accuracy.axhline(100 * majority, color="grey", lw=0.8, ls=":")
    accuracy.annotate(  # below the line, at the right: no network scores below it
        f"always the commonest digit: {100 * majority:.2f}%",
        (1, 100 * majority),
        xycoords=("axes fraction", "data"),
        xytext=(-3, -3),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=8,
        color="grey",
    )
    accuracy.set(ylabel="accuracy (%)", ylim=(0, 101), title="Accuracy after training at noise σ")
    gap.axhline(0, color="grey", lw=0.8)
    gap.set(ylabel="train − val (points)", title="Train − validation gap")
    seeds = len({int(r["seed"]) for r in results})
    fig.suptitle(f"Mean ± std over {seeds} seed(s); train accuracy with dropout on, over the last epoch", fontsize=9)
    fig.tight_layout()
    return fig


def preview_figure(images: torch.Tensor, rows: list[tuple[str, float]]) -> Figure:
    """The same digits at every training level: ``images`` ``[row, digit, 1, H, W]``, a row per (corruption,
    severity) of ``rows``; pixels shown clipped to [0, 1]."""
    n = images.shape[1]
    gaussian = only_gaussian(rows)
    fig = Figure(figsize=(n * 0.8 + (0 if gaussian else 0.6), len(rows) * 0.85))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for axes_row, cell, digits in zip(axes, rows, images.cpu().clamp(0, 1)):
        for ax, image in zip(axes_row, digits):
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        name = f"σ={sigma_text(cell[1])}" if gaussian else label(cell, False)
        axes_row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"The same validation digits at every {'noise level' if gaussian else 'training level'}", fontsize=10)
    fig.tight_layout()
    return fig


def corruption_preview(images: dict[tuple[str, float], torch.Tensor], digits: int = 4) -> Figure:
    """Every evaluated corruption (a row) at each of its severities (columns, clean first), the same ``digits``
    validation digits side by side in each; ``images``: (corruption, severity) -> ``[digit, 1, H, W]``."""
    corruptions = list(dict.fromkeys(c for c, s in images if s > 0))
    levels = {c: [s for e, s in images if e == c and s > 0] for c in corruptions}
    columns = 1 + max(len(v) for v in levels.values())
    fig = Figure(figsize=(columns * 1.9, len(corruptions) * 0.75 + 0.4))
    axes = fig.subplots(len(corruptions), columns, squeeze=False)
    for axes_row, corruption in zip(axes, corruptions):
        for ax, severity in zip(axes_row, [0.0, *levels[corruption]]):
            strip = images[CLEAN if severity == 0 else (corruption, severity)][:digits, 0].cpu().clamp(0, 1)
            ax.imshow(torch.cat(list(strip), dim=1), cmap="gray", vmin=0, vmax=1)
            ax.set_title("clean" if severity == 0 else f"{corruption} {sigma_text(severity)}", fontsize=8, pad=2)
        for ax in axes_row:
            ax.axis("off")
    fig.suptitle("The same validation digits under every evaluated corruption, at each severity", fontsize=10)
    fig.tight_layout()
    return fig


def robustness_figure(robustness: list[dict]) -> Figure:
    """Heatmap per network: rows = training (corruption, severity), columns = evaluation (corruption, severity),
    cells = val accuracy (%), mean over seeds. For Gaussian noise alone, rows and columns are σ."""
    networks = list(dict.fromkeys(r["network"] for r in robustness))
    train_cells = cell_order(trained_on(r, "train_") for r in robustness)
    eval_cells = cell_order(trained_on(r, "eval_") for r in robustness)
    gaussian = only_gaussian(train_cells + eval_cells)
    width, height = (
        (5.5, 4.5) if gaussian else (max(6.5, 0.55 * len(eval_cells) + 2.5), max(4.5, 0.4 * len(train_cells) + 2))
    )
    fig = Figure(figsize=(width * len(networks), height))
    axes = fig.subplots(1, len(networks), squeeze=False)
    for ax, network in zip(axes[0], networks):
        cells = defaultdict(list)
        for r in robustness:
            if r["network"] == network:
                cells[trained_on(r, "train_"), trained_on(r, "eval_")].append(100 * float(r["acc"]))
        rows = [t for t in train_cells if any(k[0] == t for k in cells)]
        grid = [
            [statistics.fmean(cells[t, e]) if cells.get((t, e)) else float("nan") for e in eval_cells] for t in rows
        ]
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto" if not gaussian else None)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(
                    j, i, f"{value:.1f}" if gaussian else f"{value:.0f}", ha="center", va="center",
                    fontsize=8 if gaussian else 7, color="white" if value < 60 else "black",
                )  # fmt: skip
        if gaussian:
            ax.set_xticks(range(len(eval_cells)), [sigma_text(s) for _, s in eval_cells])
            ax.set_yticks(range(len(rows)), [sigma_text(s) for _, s in rows])
            ax.set(xlabel="evaluated at σ", ylabel="trained at σ", title=f"{network}: validation accuracy (%)")
        else:
            ax.set_xticks(range(len(eval_cells)), [label(e, False) for e in eval_cells], rotation=60, ha="right")
            ax.set_yticks(range(len(rows)), [label(t, False) for t in rows])
            ax.tick_params(labelsize=8)
            ax.set(xlabel="evaluated on", ylabel="trained on", title=f"{network}: val. accuracy (%), mean over seeds")
    fig.tight_layout()
    return fig


def write_report(
    out: Path,
    results: list[dict],
    robustness: list[dict],
    datamodule,
    members: list[Member],
    cells: list[tuple],
    recipe: str | None = None,
) -> list[str]:
    """Writes the study's table and figures into ``out``, and the figures into its TensorBoard root run; returns
    the files' names. ``members`` and ``cells``: the study's members and the (corruption, severity) each is
    evaluated at, whose previews it shows; ``recipe``: how they were trained, when not the default."""
    (out / "summary.md").write_text(summary_markdown(results, robustness, recipe))
    labels = datamodule.labels("val")
    majority = torch.bincount(labels).max().item() / len(labels)
    seed = int(results[0]["seed"])
    picks = torch.stack([torch.nonzero(labels == d)[0, 0] for d in range(PREVIEW_DIGITS)])
    levels = cell_order((m.corruption.name, m.noise_scale) for m in members)
    by_name = {m.corruption.name: m.corruption for m in members}
    preview, _ = datamodule.noisy_images("val", {seed: picks}, [Member(s, seed, by_name[c]) for c, s in levels])
    figures = {
        "accuracy_vs_noise": accuracy_figure(results, majority),
        "noise_preview": preview_figure(preview, levels),
        "robustness": robustness_figure(robustness),
    }
    measures = corruption_measures(robustness)
    if measures and not only_gaussian([trained_on(r, "eval_") for r in robustness] + levels):
        figures["corruption_errors"] = corruption_error_figure(measures)
    if not only_gaussian([(c.name, s) for c, s in cells] + levels):
        shown, _ = datamodule.noisy_images("val", {seed: picks}, [Member(s, seed, c) for c, s in cells])
        figures["corruption_preview"] = corruption_preview(
            {(c.name, s): images for (c, s), images in zip(cells, shown)}
        )
    writer = SummaryWriter(str(out / "tensorboard"))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
        writer.add_figure(f"study/{name}", fig)
    writer.close()
    return ["summary.md", *(f"{name}.png" for name in figures)]
