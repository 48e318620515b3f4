"""A sweep's report: ``summary.md``, ``accuracy_vs_noise.png``, ``noise_preview.png``, ``robustness.png``."""

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

PREVIEW_DIGITS = 10  # the first validation image of each digit 0-9: a fixed choice


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict[str, str]]) -> dict[str, dict[float, dict[str, list[float]]]]:
    """model -> σ -> {"train_acc": [per seed], "val_acc": [...], "gap": [...]}."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in results:
        cell = table[row["model"]][float(row["noise_scale"])]
        train, val = float(row["train_acc"]), float(row["val_acc"])
        cell["train_acc"].append(train)
        cell["val_acc"].append(val)
        cell["gap"].append(train - val)
    return table


def _fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def summary_markdown(results: list[dict[str, str]]) -> str:
    """One table per model: rows = σ (clean first), train and validation accuracy (%) and their gap."""
    lines = []
    for model, by_scale in sorted(aggregate(results).items()):
        rows = [r for r in results if r["model"] == model]
        seeds = sorted({int(r["seed"]) for r in rows})
        epochs = sorted({int(r["epochs"]) for r in rows})
        modes = sorted({r["noise_mode"] for r in rows})
        spread = " (mean ± std over seeds)" if len(seeds) > 1 else ""
        lines += [
            f"### {model}: {', '.join(map(str, epochs))} epochs, noise_mode {', '.join(modes)}, seeds {seeds}{spread}",
            "",
            "| σ | train acc (%) | val acc (%) | train − val (points) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for scale, cell in sorted(by_scale.items()):
            name = f"{scale:g} (clean)" if scale == 0 else f"{scale:g}"
            lines.append(f"| {name} | {_fmt(cell['train_acc'])} | {_fmt(cell['val_acc'])} | {_fmt(cell['gap'])} |")
        lines.append("")
    return "\n".join(lines)


def accuracy_figure(results: list[dict[str, str]]) -> plt.Figure:
    """Train (dashed) and validation (solid) accuracy against σ, one colour per model, ± std shaded."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, (model, by_scale) in zip(plt.cm.tab10.colors, sorted(aggregate(results).items())):
        scales = sorted(by_scale)
        for split, style in (("train_acc", "--"), ("val_acc", "-")):
            stats = [mean_std([100 * v for v in by_scale[s][split]]) for s in scales]
            means = [m for m, _ in stats]
            ax.plot(scales, means, style, marker="o", color=colour, label=f"{model} {split.split('_')[0]}")
            ax.fill_between(scales, [m - s for m, s in stats], [m + s for m, s in stats], color=colour, alpha=0.15)
    ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)  # shows σ = 0 and 0.1 ... 4 (or 255 x that) alike
    all_scales = sorted({float(r["noise_scale"]) for r in results})
    ax.set_xticks(all_scales, [f"{s:g}" for s in all_scales])
    ax.minorticks_off()
    ax.axhline(11.35, color="grey", lw=0.8, ls=":")
    ax.annotate('always "1": 11.35%', (0, 11.35), xytext=(2, 3), textcoords="offset points", fontsize=8, color="grey")
    ax.set(xlabel="noise std σ (units of the [0, 1] pixel range)", ylabel="accuracy (%)", ylim=(0, 101))
    ax.set_title("Accuracy after training at noise σ (train: dropout on, running over the last epoch)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def preview_figure(dm, scales: list[float]) -> plt.Figure:
    """The same digits (one of each class) at every σ: rows = σ; pixels shown clipped to [0, 1]."""
    labels = dm.split_labels("val")  # on the data's device, so the picks index the images there
    picks = torch.stack([torch.nonzero(labels == d)[0, 0] for d in range(PREVIEW_DIGITS)])
    fig, axes = plt.subplots(len(scales), len(picks), figsize=(len(picks) * 0.8, len(scales) * 0.85), squeeze=False)
    for row, scale in zip(axes, scales):
        images = dm.noisy("val", scale)[picks].cpu().clamp(0, 1)
        for ax, image in zip(row, images):
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"σ={scale:g}", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("The same validation digits at every noise level", fontsize=10)
    fig.tight_layout()
    return fig


def robustness_figure(robustness: list[dict[str, str]]) -> plt.Figure:
    """Heatmap per model: rows = training σ, columns = evaluation σ, cells = val accuracy (%), mean over seeds."""
    models = sorted({r["model"] for r in robustness})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        cells = defaultdict(list)
        for r in robustness:
            if r["model"] == model:
                cells[float(r["train_noise_scale"]), float(r["eval_noise_scale"])].append(100 * float(r["acc"]))
        train_scales = sorted({t for t, _ in cells})
        eval_scales = sorted({e for _, e in cells})
        grid = [[statistics.fmean(cells[t, e]) if cells.get((t, e)) else float("nan") for e in eval_scales] for t in train_scales]
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if value < 60 else "black")
        ax.set_xticks(range(len(eval_scales)), [f"{s:g}" for s in eval_scales])
        ax.set_yticks(range(len(train_scales)), [f"{s:g}" for s in train_scales])
        ax.set(xlabel="evaluated at σ", ylabel="trained at σ", title=f"{model}: validation accuracy (%)")
    fig.tight_layout()
    return fig


def write_report(out: Path, results: list[dict[str, str]], robustness: list[dict[str, str]], dm, scales: list[float]) -> None:
    """Writes the sweep's table and figures into ``out``, and the figures into TensorBoard too."""
    (out / "summary.md").write_text(summary_markdown(results))
    figures = {"noise_preview": preview_figure(dm, scales)}
    if results:
        figures["accuracy_vs_noise"] = accuracy_figure(results)
    if robustness:
        figures["robustness"] = robustness_figure(robustness)
    writer = SummaryWriter(str(out / "tb_logs" / "sweep_report"))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
        writer.add_figure(f"sweep/{name}", fig)  # closes the figure
    writer.close()
