"""Each member's expected calibration error, against an independent numpy computation and torchmetrics'
``MulticlassCalibrationError`` (15 bins, L1), and on predictors whose ECE is known."""

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from noise_robustness.calibration import BINS, MemberCalibration, calibration_sums, expected_calibration_error


def numpy_ece(logits: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Guo et al.'s ECE, written from its definition: bins (lo, hi] of the top softmax probability (a confidence of
    exactly 0 in the first bin), Σ_b (n_b / N) |accuracy_b − confidence_b|."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else confidence <= hi
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return ece


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sharpness", [0.3, 1.0, 4.0])
def test_each_member_ece_is_numpy_and_torchmetrics_own(seed, sharpness):
    generator = torch.Generator().manual_seed(seed)
    members, images, classes = 3, 500, 10
    logits = sharpness * torch.randn(members, images, classes, generator=generator)
    labels = torch.randint(classes, (members, images), generator=generator)
    logits[..., 0] += 2.0  # some members right more often than chance, some confident
    metric = MemberCalibration(members)
    for chunk in range(0, images, 128):  # batches added up: the same as all images at once
        metric.update(logits[:, chunk : chunk + 128], labels[:, chunk : chunk + 128])
    ece = expected_calibration_error(metric.compute())
    for k in range(members):
        reference = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")(logits[k], labels[k])
        assert ece[k].item() == pytest.approx(reference.item(), abs=1e-6)
        assert ece[k].item() == pytest.approx(numpy_ece(logits[k].double().numpy(), labels[k].numpy()), abs=1e-6)


def test_a_calibrated_predictor_has_an_ece_near_zero():
    """Correct with probability its confidence, in every bin: the ECE is sampling noise, ~1/sqrt(images per bin)."""
    generator = torch.Generator().manual_seed(0)
    images, classes = 200_000, 10
    confidence = 0.1 + 0.9 * torch.rand(images, generator=generator)
    labels = torch.randint(classes, (images,), generator=generator)
    right = torch.rand(images, generator=generator) < confidence
    predicted = torch.where(right, labels, (labels + 1 + torch.randint(classes - 1, (images,))) % classes)
    # logits whose softmax gives `confidence` to the predicted class and shares the rest evenly
    rest = (1 - confidence) / (classes - 1)
    probabilities = rest[:, None].expand(images, classes).clone()
    probabilities[torch.arange(images), predicted] = confidence
    sums = calibration_sums(probabilities.log()[None], labels[None])
    assert expected_calibration_error(sums).item() < 0.005


def test_a_constant_confidence_predictor_has_the_gap_as_its_ece():
    """Confidence 0.9 in every image and accuracy 0.6: one bin, ECE = |0.6 − 0.9| = 0.3 exactly."""
    images, classes = 1000, 10
    labels = torch.arange(images) % classes
    predicted = torch.where(torch.arange(images) < 600, labels, (labels + 1) % classes)
    probabilities = torch.full((images, classes), 0.1 / (classes - 1))
    probabilities[torch.arange(images), predicted] = 0.9
    sums = calibration_sums(probabilities.log()[None], labels[None])
    assert expected_calibration_error(sums).item() == pytest.approx(0.3, abs=1e-6)
    assert sums[0, 0].count_nonzero() == 1  # one bin holds every image


def test_the_summary_tables_the_ece_of_the_networks_that_measured_it():
    """A study compared beside one made before the ECE was measured: the calibration table has the study's rows alone,
    mean ± std over seeds, and a study without any ECE gets none."""
    from noise_robustness.study.report import summary_markdown

    def row(network, seed, train, evaluated, acc, ece):
        return {"network": network, "seed": seed, "train_noise_scale": train, "eval_noise_scale": evaluated,
                "acc": acc, "ece": ece}  # fmt: skip

    results = [
        {"network": net, "noise_scale": s, "seed": seed, "train_acc": 0.9, "val_acc": 0.8, "epochs": 1,
         "noise_mode": "fixed", "clip": False}
        for net in ("MLP", "CNN") for s in (0.0, 1.0) for seed in (0, 1)
    ]  # fmt: skip
    robustness = [
        row("MLP", seed, t, e, 0.8, 0.01 * (1 + seed) + 0.1 * t + 0.2 * e)
        for seed in (0, 1)
        for t in (0.0, 1.0)
        for e in (0.0, 1.0)
    ] + [row("CNN", seed, t, e, 0.9, "") for seed in (0, 1) for t in (0.0, 1.0) for e in (0.0, 1.0)]
    summary = summary_markdown(results, robustness)
    assert "### MLP: calibration error, ECE (%), mean ± std over seeds [0, 1]" in summary
    assert "CNN: calibration error" not in summary
    assert "| 1 | 11.50 ± 0.71 | 31.50 ± 0.71 |" in summary  # trained at 1: ECE 0.11, 0.12 clean; 0.31, 0.32 at 1
    assert "calibration error" not in summary_markdown(results, [r for r in robustness if r["network"] == "CNN"])
