"""A study's report: ``summary.md``, ``accuracy_vs_noise.png``, ``noise_preview.png``, ``robustness.png``,
``calibration.png``."""

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from noise_robustness.files import write_atomic
from noise_robustness.study.figures import (
    accuracy_figure,
    calibration_figure,
    corruption_error_figure,
    corruption_preview,
    preview_figure,
    robustness_figure,
)  # fmt: skip
from noise_robustness.study.measures import (
    aggregate,
    calibrated,
    cell_order,
    corrupted,
    corruption_measures,
    label,
    only_gaussian,
    trained_on,
    with_ece,
)  # fmt: skip
from noise_robustness.study.members import Member, sigma_text
from noise_robustness.study.text import percent

PREVIEW_DIGITS = 10  # the first validation image of each digit 0-9: a fixed choice
AUC_NOTE = (
    "clean: the accuracy on clean validation images. Each corruption: the mean accuracy from severity 0 to the "
    "largest evaluated (trapezoids from the clean accuracy); mean: their mean over the corruptions."
)
CE_NOTE = (
    "Each: the member's errors summed over the corruption's severities, over those of the clean-trained member of "
    "the same network and seed (the baseline: 100 %); mCE: their mean over the corruptions."
)


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
        values = [percent(table[n][cell]["val_acc"]) if cell in table[n] else "" for n in networks]
        lines.append(f"| {label(cell, gaussian)} | {' | '.join(values)} |")
    return [*lines, ""]


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
                f"| {label(cell, gaussian)} | {percent(values['train_acc'])} | {percent(values['val_acc'])} | "
                f"{percent(values['gap'])} |"
            )
        lines.append("")
    measured = with_ece(robustness or [])  # a compared study may predate the ECE
    if measured:
        lines += calibration_summary(measured)
    if robustness and corrupted(results, robustness):
        lines += corruption_summary(robustness)
    return "\n".join(lines)


ECE_NOTE = (
    "Expected calibration error (torchmetrics' `MulticlassCalibrationError`, 15 bins, L1) on the validation "
    "images: the gap between a member's top softmax probability and its accuracy in each confidence bin, weighted "
    "by the bin's share of the images; 0 when calibrated. Rows: what the member trained on; columns: what it was "
    "evaluated on."
)


def calibration_summary(robustness: list[dict]) -> list[str]:
    """Per network, the train × evaluation matrix of the members' ECE (%), mean ± std over seeds."""
    lines = []
    for network in dict.fromkeys(r["network"] for r in robustness):
        rows = [r for r in robustness if r["network"] == network]
        seeds = sorted({int(r["seed"]) for r in rows})
        trained = cell_order(trained_on(r, "train_") for r in rows)
        evaluated = cell_order(trained_on(r, "eval_") for r in rows)
        gaussian = only_gaussian(trained + evaluated)
        values: dict = {}
        for r in rows:
            values.setdefault((trained_on(r, "train_"), trained_on(r, "eval_")), []).append(float(r["ece"]))
        spread = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
        lines += [f"### {network}: calibration error, ECE (%), {spread}", "", ECE_NOTE, ""]
        corner = "trained at σ \\ evaluated at σ" if gaussian else "trained on \\ evaluated on"
        lines.append(f"| {corner} | {' | '.join(label(e, gaussian) for e in evaluated)} |")
        lines.append(f"| ---: |{' ---: |' * len(evaluated)}")
        for train in trained:
            cells = [percent(values[train, e]) if (train, e) in values else "" for e in evaluated]
            lines.append(f"| {label(train, gaussian)} | {' | '.join(cells)} |")
        lines.append("")
    return lines


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
                values = [percent(column) if column else "" for column in columns]
                lines.append(f"| {label(train, False)} | {' | '.join(values)} |")
            lines.append("")
    return lines


def write_report(
    out: Path,
    results: list[dict],
    robustness: list[dict],
    datamodule,
    members: list[Member],
    cells: list[tuple],
    recipe: str | None = None,
    reliability: Member | None = None,
) -> list[str]:
    """Writes the study's table and figures into ``out``, and the figures into its TensorBoard root run; returns
    the files' names. ``members`` and ``cells``: the study's members and the (corruption, severity) each is
    evaluated at, whose previews it shows; ``recipe``: how they were trained, when not the default; ``reliability``:
    the member whose reliability diagram ``calibration.png`` shows (default: the first)."""
    write_atomic(out / "summary.md", summary_markdown(results, robustness, recipe))
    labels = datamodule.labels("val")
    majority = torch.bincount(labels).max().item() / len(labels)
    seed = int(results[0]["seed"])
    # the first image of each of the first classes (MNIST: the digits 0 to 9), whatever classes the data has
    classes = labels.unique()[:PREVIEW_DIGITS]
    picks = torch.stack([torch.nonzero(labels == c)[0, 0] for c in classes])
    levels = cell_order((m.corruption.name, m.noise_scale) for m in members)
    by_name = {m.corruption.name: m.corruption for m in members}
    preview, _ = datamodule.noisy_images("val", {seed: picks}, [Member(s, seed, by_name[c]) for c, s in levels])
    figures = {
        "accuracy_vs_noise": accuracy_figure(results, majority),
        "noise_preview": preview_figure(preview, levels),
        "robustness": robustness_figure(robustness),
    }
    own = [r for r in robustness if r["network"] == results[0]["network"]]  # this study's rows come first
    if calibrated(own):
        shown = reliability or members[0]
        cell = (shown.corruption.name, shown.noise_scale)
        rows = [r for r in own if int(r["seed"]) == shown.seed and trained_on(r, "train_") == cell]
        figures["calibration"] = calibration_figure(with_ece(robustness), shown.name, rows)
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
        write_atomic(out / f"{name}.png", lambda file, fig=fig: fig.savefig(file, format="png", dpi=120))
        writer.add_figure(f"study/{name}", fig)
    writer.close()
    return ["summary.md", *(f"{name}.png" for name in figures)]
