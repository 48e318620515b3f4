"""How a study speaks: one status printer and one number formatter for every command and table."""

import statistics
import sys


def say(command: str, text: str) -> None:
    """A status line on stderr, ``[sweep] ...``: what a command is doing, for a terminal or a job's log."""
    print(f"[{command}] {text}", file=sys.stderr, flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(values: list[float], decimals: int = 2) -> str:
    """Fractions over seeds as percent, ``98.38 ± 0.08`` (mean ± sample std), or ``98.38`` for one seed."""
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if len(values) > 1 else f"{mean:.{decimals}f}"
