"""A study's figures: accuracy against σ, the noise preview, the train × evaluation matrix, corruption errors."""

import statistics

import matplotlib
import torch
from matplotlib.figure import Figure  # a Figure of its own needs no pyplot and no display backend

from noise_robustness.calibration import BINS, SUMS
from noise_robustness.corruptions import GAUSSIAN
from noise_robustness.study.measures import (
    CLEAN,
    CorruptionMeasures,
    aggregate,
    cell_order,
    label,
    only_gaussian,
    robustness_matrix,
    trained_on,
)  # fmt: skip
from noise_robustness.study.members import sigma_text
from noise_robustness.study.text import mean_std

RELIABLE_BIN = 0.005  # the reliability diagram's bins: those with at least this share of the images


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


def picture(image: torch.Tensor) -> torch.Tensor:
    """An image ``[C, H, W]`` as imshow takes it: ``[H, W]`` grey (shown in a grey colour map), ``[H, W, 3]``."""
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)


def preview_figure(images: torch.Tensor, rows: list[tuple[str, float]]) -> Figure:
    """The same digits at every training level: ``images`` ``[row, digit, C, H, W]``, a row per (corruption,
    severity) of ``rows``; pixels shown clipped to [0, 1]."""
    n = images.shape[1]
    gaussian = only_gaussian(rows)
    fig = Figure(figsize=(n * 0.8 + (0 if gaussian else 0.6), len(rows) * 0.85))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for axes_row, cell, digits in zip(axes, rows, images.cpu().clamp(0, 1)):
        for ax, image in zip(axes_row, digits):
            ax.imshow(picture(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        name = f"σ={sigma_text(cell[1])}" if gaussian else label(cell, False)
        axes_row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"The same validation digits at every {'noise level' if gaussian else 'training level'}", fontsize=10)
    fig.tight_layout()
    return fig


def corruption_preview(images: dict[tuple[str, float], torch.Tensor], digits: int = 4) -> Figure:
    """Every evaluated corruption (a row) at each of its severities (columns, clean first), the same ``digits``
    validation digits side by side in each; ``images``: (corruption, severity) -> ``[digit, C, H, W]``."""
    corruptions = list(dict.fromkeys(c for c, s in images if s > 0))
    levels = {c: [s for e, s in images if e == c and s > 0] for c in corruptions}
    columns = 1 + max(len(v) for v in levels.values())
    fig = Figure(figsize=(columns * 1.9, len(corruptions) * 0.75 + 0.4))
    axes = fig.subplots(len(corruptions), columns, squeeze=False)
    for axes_row, corruption in zip(axes, corruptions):
        for ax, severity in zip(axes_row, [0.0, *levels[corruption]]):
            strip = images[CLEAN if severity == 0 else (corruption, severity)][:digits].cpu().clamp(0, 1)
            ax.imshow(picture(torch.cat(list(strip), dim=-1)), cmap="gray", vmin=0, vmax=1)
            ax.set_title("clean" if severity == 0 else f"{corruption} {sigma_text(severity)}", fontsize=8, pad=2)
        for ax in axes_row:
            ax.axis("off")
    fig.suptitle("The same validation digits under every evaluated corruption, at each severity", fontsize=10)
    fig.tight_layout()
    return fig


def robustness_figure(robustness: list[dict], value: str = "acc") -> Figure:
    """Heatmap per network: rows = training (corruption, severity), columns = evaluation (corruption, severity),
    cells = val accuracy (%; ``value`` ``ece``: the expected calibration error, %), mean over seeds. For Gaussian
    noise alone, rows and columns are σ."""
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
        matrix_axes(ax, robustness, network, value, train_cells, eval_cells)
    fig.tight_layout()
    return fig


def matrix_axes(ax, robustness: list[dict], network: str, value: str, train_cells: list, eval_cells: list) -> None:
    """One network's train × evaluation heatmap of ``value`` (``acc`` or ``ece``, in %) on ``ax``."""
    gaussian = only_gaussian(train_cells + eval_cells)
    matrix = robustness_matrix(robustness, network, scale=100, value=value)  # percent
    rows = [t for t in train_cells if t in matrix]
    grid = [[matrix[t].get(e, float("nan")) for e in eval_cells] for t in rows]
    if value == "acc":  # bright: accurate
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto" if not gaussian else None)
        dark, what = [[v < 60 for v in row] for row in grid], "validation accuracy (%)"
    else:  # bright: calibrated
        top = max((v for row in grid for v in row if v == v), default=1.0)  # missing cells (NaN) left out
        ax.imshow(grid, cmap="viridis_r", vmin=0, vmax=top, aspect="auto" if not gaussian else None)
        dark, what = [[v > 0.4 * top for v in row] for row in grid], "calibration error, ECE (%)"
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            ax.text(
                j, i, f"{cell:.1f}" if gaussian else f"{cell:.0f}", ha="center", va="center",
                fontsize=8 if gaussian else 7, color="white" if dark[i][j] else "black",
            )  # fmt: skip
    if gaussian:
        ax.set_xticks(range(len(eval_cells)), [sigma_text(s) for _, s in eval_cells])
        ax.set_yticks(range(len(rows)), [sigma_text(s) for _, s in rows])
        ax.set(xlabel="evaluated at σ", ylabel="trained at σ", title=f"{network}: {what}")
    else:
        ax.set_xticks(range(len(eval_cells)), [label(e, False) for e in eval_cells], rotation=60, ha="right")
        ax.set_yticks(range(len(rows)), [label(t, False) for t in rows])
        ax.tick_params(labelsize=8)
        ax.set(xlabel="evaluated on", ylabel="trained on", title=f"{network}: {what}, mean over seeds")


def calibration_figure(robustness: list[dict], member: str, rows: list[dict]) -> Figure:
    """The ECE matrix of every network (``robustness_figure``'s layout), and the reliability diagram of one
    ``member`` (named): for each evaluation its bins' accuracy against their mean confidence (a calibrated member
    lies on the diagonal; below it: overconfident), each bin's marker sized by its share of the images (bins under
    ``RELIABLE_BIN`` of them left out). ``rows``: the member's robustness rows, with their bins."""
    networks = list(dict.fromkeys(r["network"] for r in robustness))
    train_cells = cell_order(trained_on(r, "train_") for r in robustness)
    eval_cells = cell_order(trained_on(r, "eval_") for r in robustness)
    fig = Figure(figsize=(5.5 * (len(networks) + 1), 4.5))
    axes = fig.subplots(1, len(networks) + 1, squeeze=False)[0]
    for ax, network in zip(axes, networks):
        matrix_axes(ax, robustness, network, "ece", train_cells, eval_cells)
    ax = axes[-1]
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="calibrated")
    gaussian = only_gaussian(eval_cells)
    colours = matplotlib.colormaps["plasma"]
    for i, row in enumerate(sorted(rows, key=lambda r: eval_cells.index(trained_on(r, "eval_")))):
        images, confidence, correct = (torch.tensor(row["calibration"][name], dtype=torch.float64) for name in SUMS)
        seen = images >= RELIABLE_BIN * images.sum()  # a bin of a few images says little: left out
        x, y = (confidence[seen] / images[seen]).tolist(), (correct[seen] / images[seen]).tolist()
        colour = colours(i / max(1, len(rows) - 1) * 0.85)
        name = f"{label(trained_on(row, 'eval_'), gaussian)}: ECE {100 * float(row['ece']):.1f} %"
        ax.plot(x, y, color=colour, lw=1, alpha=0.6, label=name)
        ax.scatter(x, y, s=(300 * images[seen] / images.sum()).tolist(), color=colour)  # area: the bin's share
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean of the bin)", ylabel="accuracy of the bin")
    ax.set_title(f"{rows[0]['network']} {member}: reliability ({BINS} bins)")
    ax.legend(title="evaluated at σ" if gaussian else "evaluated on", fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
