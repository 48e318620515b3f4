"""What a study's result rows measure: rows grouped by network, cell and seed; the area under accuracy against
severity and the corruption error (mCE) of every member."""

import statistics
from collections import defaultdict
from dataclasses import dataclass

from noise_robustness.corruptions import GAUSSIAN
from noise_robustness.study.members import sigma_text


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


def robustness_matrix(robustness: list[dict], network: str | None = None, scale: float = 1.0, value="acc") -> dict:
    """The robustness rows (of ``network``; default: all) as a train × evaluation matrix: (training corruption,
    severity) -> (evaluation corruption, severity) -> ``value`` (accuracy, or ``ece``) × ``scale``, the mean over the
    members' seeds."""
    cells: dict = defaultdict(list)
    for r in robustness:
        if network is None or r["network"] == network:
            cells[trained_on(r, "train_"), trained_on(r, "eval_")].append(scale * float(r[value]))
    matrix: dict = defaultdict(dict)
    for (train, evaluated), values in cells.items():
        matrix[train][evaluated] = statistics.fmean(values)
    return dict(matrix)


def with_ece(robustness: list[dict]) -> list[dict]:
    """The robustness rows that have their member's ECE (rows written before calibration was measured have none)."""
    return [r for r in robustness if r.get("ece") not in (None, "")]


def calibrated(robustness: list[dict]) -> bool:
    """Whether every robustness row has its member's ECE."""
    return bool(robustness) and len(with_ece(robustness)) == len(robustness)


def only_gaussian(cells) -> bool:
    return all(corruption == GAUSSIAN.name for corruption, _ in cells)


def corrupted(results: list[dict], robustness: list[dict]) -> bool:
    """Whether any member trained, or was evaluated, on another corruption than Gaussian noise: what adds the
    corruption summary to ``summary.md``."""
    return not only_gaussian([trained_on(r) for r in results] + [trained_on(r, "eval_") for r in robustness])


CLEAN = (GAUSSIAN.name, 0.0)


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
