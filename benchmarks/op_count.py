"""Counts the aten operations one training step dispatches: what a GPU launches, step after step.

A fit of ``n`` batches and one of ``2n`` batches are counted under a ``TorchDispatchMode``; their
difference, divided by ``n``, is one step's operations (forward, loss, backward, optimizer, batch
composition, metrics, Lightning's loop), with the epoch's fixed costs cancelled. Views (reshapes,
transposes, slices) and the profiler's labels (``record_function`` around an optimizer step) are left
out: they launch nothing.
"""

import collections
import tempfile

from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented hook for dispatched ops

from noise_robustness.cli import cli_main
from noise_robustness.commands import STUDY_SCALES

VIEWS = {
    "view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "unsqueeze", "squeeze", "permute", "alias",
    "slice", "select", "detach", "reshape", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "_reshape_alias", "view_as", "lift_fresh",
}  # fmt: skip
# Members K -> (scales, seeds) of the studies counted at K = 1, 6 and 18 (one noisy member; the default study of one
# seed; the main job), by the benchmark and by the tests.
STUDIES_BY_K = {1: ([1.0], [0]), 6: (STUDY_SCALES, [0]), 18: (STUDY_SCALES, [0, 1, 2])}
PROFILER_MARKS = {"_record_function_enter_new", "_record_function_exit"}  # torch.profiler's labels: no work


class CountOps(TorchDispatchMode):
    """Counts every non-view aten operation dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS and name not in PROFILER_MARKS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def fit_ops(data_dir: str, scales: list[float], seeds: list[int], batches: int, *options: str) -> collections.Counter:
    """The operations of a whole ``fit`` of one epoch of ``batches`` batches (no validation)."""
    counter = CountOps()
    with tempfile.TemporaryDirectory() as tmp, counter:
        cli_main(
            [
                "fit", f"--scales={scales}", f"--seeds={seeds}", f"--data.data_dir={data_dir}",
                "--trainer.max_epochs=1", f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={tmp}", *options,
            ]
        )  # fmt: skip
    return counter.ops


def ops_per_step(
    data_dir: str, scales: list[float], seeds: list[int], *options: str, n: int = 10
) -> collections.Counter:
    """One training step's operations, by name (the difference of fits of ``2n`` and ``n`` batches, over ``n``;
    after a fit of one batch, so that what a process does once, such as reading MNIST, counts in neither)."""
    fit_ops(data_dir, scales, seeds, 1, *options)
    more = fit_ops(data_dir, scales, seeds, 2 * n, *options)
    more.subtract(fit_ops(data_dir, scales, seeds, n, *options))
    return collections.Counter({name: count / n for name, count in more.items() if count})
