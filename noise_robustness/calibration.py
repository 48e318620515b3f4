"""Expected calibration error (ECE) of every member: torchmetrics' ``MulticlassCalibrationError`` (15 bins, L1 norm)
kept as binned sums, so that K members cost three ``[K, bins + 1]`` sums a batch instead of every image's
confidence.

A member's confidence in an image is its top softmax probability. The images are binned by confidence into
``BINS`` equal bins of [0, 1] (torchmetrics' ``bucketize(..., right=True) - 1``: a confidence of exactly 1 has a
bin of its own, as there); the ECE is Σ_b (n_b / N) |accuracy_b − mean confidence_b| = Σ_b |correct_b −
confidence sum_b| / N: 0 for a member whose confidence is its accuracy in every bin.
"""

import torch
from torchmetrics import Metric

BINS = 15  # torchmetrics' default, and Guo et al.'s (2017)
SUMS = ("images", "confidence", "correct")  # what each bin sums, in this order


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """``logits`` ``[K, B, classes]`` and ``labels`` ``[K, B]`` -> ``[3, K, bins + 1]`` float64: per member and
    confidence bin, the images, their confidences summed and their correct predictions (``SUMS``)."""
    confidence, prediction = logits.float().softmax(dim=-1).max(dim=-1)
    boundaries = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, boundaries, right=True) - 1  # as torchmetrics bins them
    sums = torch.zeros(len(SUMS), *labels.shape[:1], bins + 1, dtype=torch.float64, device=logits.device)
    for row, values in enumerate((torch.ones_like(confidence), confidence, prediction == labels)):
        sums[row].scatter_add_(1, index, values.double())
    return sums


def expected_calibration_error(sums: torch.Tensor) -> torch.Tensor:
    """``[K]``: each member's ECE from its ``calibration_sums`` (added up over batches)."""
    images, confidence, correct = sums
    return (correct - confidence).abs().sum(dim=-1) / images.sum(dim=-1)


class MemberCalibration(Metric):
    """Per member, the calibration sums of the images seen: updated every test step on the device, summed across
    DDP processes, read once a pass."""

    full_state_update = False

    def __init__(self, members: int, bins: int = BINS):
        super().__init__()
        self.bins = bins
        self.add_state("sums", torch.zeros(len(SUMS), members, bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums += calibration_sums(logits, labels, self.bins)

    def compute(self) -> torch.Tensor:
        return self.sums
