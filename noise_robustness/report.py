"""A study's report: ``summary.md``, ``accuracy_vs_noise.png``, ``noise_preview.png``, ``robustness.png``."""

import statistics
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.figure import Figure  # a Figure of its own needs no pyplot and no display backend
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.study import Member, sigma_text

PREVIEW_DIGITS = 10  # the first validation image of each digit 0-9: a fixed choice


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> dict[str, dict[float, dict[str, list[float]]]]:
    """network (in the order of ``results``) -> σ -> {"train_acc": [per seed], "val_acc": [...], "gap": [...]}."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in results:
        cell = table[row["network"]][float(row["noise_scale"])]
        train, val = float(row["train_acc"]), float(row["val_acc"])
        cell["train_acc"].append(train)
        cell["val_acc"].append(val)
        cell["gap"].append(train - val)
    return table


def _fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def side_by_side(table: dict) -> list[str]:
    """Validation accuracy (%) of every network at every σ, one column per network."""
    networks = list(table)
    scales = sorted({s for by_scale in table.values() for s in by_scale})
    lines = [
        "### Validation accuracy (%) by network",
        "",
        f"| σ | {' | '.join(networks)} |",
        f"| ---: |{' ---: |' * len(networks)}",
    ]
    for scale in scales:
        cells = [_fmt(table[n][scale]["val_acc"]) if scale in table[n] else "" for n in networks]
        lines.append(f"| {sigma_text(scale)}{' (clean)' if scale == 0 else ''} | {' | '.join(cells)} |")
    return [*lines, ""]


def summary_markdown(results: list[dict]) -> str:
    """One table per network: rows = σ (clean first), train and validation accuracy (%) and their gap.

    With several networks, a table of their validation accuracy side by side comes first.
    """
    table = aggregate(results)
    lines = side_by_side(table) if len(table) > 1 else []
    for network, by_scale in table.items():
        rows = [r for r in results if r["network"] == network]
        seeds = sorted({int(r["seed"]) for r in rows})
        settings = ", ".join(
            f"{key} {', '.join(sorted({str(r[key]) for r in rows}))}" for key in ("epochs", "noise_mode", "clip")
        )
        spread = f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
        lines += [
            f"### {network}: {settings}, seeds {seeds}{spread}",
            "",
            "| σ | train acc (%) | val acc (%) | train − val (points) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for scale, cell in sorted(by_scale.items()):
            name = f"{sigma_text(scale)} (clean)" if scale == 0 else sigma_text(scale)
            lines.append(f"| {name} | {_fmt(cell['train_acc'])} | {_fmt(cell['val_acc'])} | {_fmt(cell['gap'])} |")
        lines.append("")
    return "\n".join(lines)


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
    for colour, (network, by_scale) in zip(colours, aggregate(results).items()):
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


def preview_figure(images: torch.Tensor, scales: list[float]) -> Figure:
    """The same digits at every σ: ``images`` ``[σ, digit, 1, H, W]``; pixels shown clipped to [0, 1]."""
    n = images.shape[1]
    fig = Figure(figsize=(n * 0.8, len(scales) * 0.85))
    axes = fig.subplots(len(scales), n, squeeze=False)
    for row, scale, digits in zip(axes, scales, images.cpu().clamp(0, 1)):
        for ax, image in zip(row, digits):
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"σ={sigma_text(scale)}", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("The same validation digits at every noise level", fontsize=10)
    fig.tight_layout()
    return fig


def robustness_figure(robustness: list[dict]) -> Figure:
    """Heatmap per network: rows = training σ, columns = evaluation σ, cells = val accuracy (%), mean over seeds."""
    networks = list(dict.fromkeys(r["network"] for r in robustness))
    fig = Figure(figsize=(5.5 * len(networks), 4.5))
    axes = fig.subplots(1, len(networks), squeeze=False)
    for ax, network in zip(axes[0], networks):
        cells = defaultdict(list)
        for r in robustness:
            if r["network"] == network:
                cells[float(r["train_noise_scale"]), float(r["eval_noise_scale"])].append(100 * float(r["acc"]))
        train_scales = sorted({t for t, _ in cells})
        eval_scales = sorted({e for _, e in cells})
        grid = [
            [statistics.fmean(cells[t, e]) if cells.get((t, e)) else float("nan") for e in eval_scales]
            for t in train_scales
        ]
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(
                    j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if value < 60 else "black"
                )
        ax.set_xticks(range(len(eval_scales)), [sigma_text(s) for s in eval_scales])
        ax.set_yticks(range(len(train_scales)), [sigma_text(s) for s in train_scales])
        ax.set(xlabel="evaluated at σ", ylabel="trained at σ", title=f"{network}: validation accuracy (%)")
    fig.tight_layout()
    return fig


def write_report(out: Path, results: list[dict], robustness: list[dict], datamodule, scales: list[float]) -> None:
    """Writes the study's table and figures into ``out``, and the figures into its TensorBoard root run."""
    (out / "summary.md").write_text(summary_markdown(results))
    labels = datamodule.labels("val")
    majority = torch.bincount(labels).max().item() / len(labels)
    seed = int(results[0]["seed"])
    picks = torch.stack([torch.nonzero(labels == d)[0, 0] for d in range(PREVIEW_DIGITS)])
    preview, _ = datamodule.noisy_images("val", {seed: picks}, [Member(s, seed) for s in scales])
    figures = {
        "accuracy_vs_noise": accuracy_figure(results, majority),
        "noise_preview": preview_figure(preview, scales),
        "robustness": robustness_figure(robustness),
    }
    writer = SummaryWriter(str(out / "tensorboard"))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
        writer.add_figure(f"study/{name}", fig)
    writer.close()
