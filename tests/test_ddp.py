"""DDP over gloo on the CPU, from the real command line: more processes change the speed, not the science."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.plugins.precision import MixedPrecision

from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.training.classifier import NoiseClassifier
from tests.conftest import independent_accuracy

REPO = Path(__file__).parents[1]
HOLDOUT = 58_001  # leaves 1,999 training images: shards of 1,000 and 999, and 58,001 validation images
SCALES, SEEDS = [0.0, 0.5], [0, 1]


@pytest.mark.slow
def test_two_processes_split_every_epoch_exactly_and_agree_with_one(data_dir, tmp_path):
    command = [
        sys.executable, "-m", "noise_robustness", "fit",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        "--trainer.callbacks+=tests.ddp_probe.RecordBatches", f"--trainer.callbacks.out={tmp_path}",
        f"--data.data_dir={data_dir}", f"--data.val_holdout={HOLDOUT}",
        f"--scales={SCALES}", f"--seeds={SEEDS}", "--data.noise_mode=resample",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    single = NoisyMNISTDataModule(
        scales=SCALES, seeds=SEEDS, data_dir=data_dir, val_holdout=HOLDOUT, noise_mode="resample"
    )
    single.setup("fit")
    for epoch in range(2):
        ranks = [torch.load(tmp_path / f"rank{r}_epoch{epoch}.pt") for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        for seed in SEEDS:
            assert (
                len(ranks[0]["positions"][seed]) == len(ranks[1]["positions"][seed]) == 8
            )  # same step count on both ranks
            positions = torch.cat([torch.cat(r["positions"][seed]) for r in ranks])
            assert torch.equal(positions.sort().values, torch.arange(1999))  # disjoint, and all of the split once
        for rank in ranks:  # the noisy images each rank saw are the single-process ones
            for step, images in enumerate(rank["images"]):
                expected, _ = single.noisy_images("train", {s: rank["positions"][s][step] for s in SEEDS}, epoch=epoch)
                assert torch.equal(images, expected)

    runs = list((tmp_path / "tb_logs").glob("*/version_*"))
    assert [p.name for p in runs] == ["version_0"]  # one run folder, not one per rank
    model = NoiseClassifier(scales=SCALES, seeds=SEEDS)
    model.load_state_dict(torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    positions = {s: torch.arange(single.split_size("val")) for s in SEEDS}
    precision = yaml.safe_load((runs[0] / "config.yaml").read_text())["trainer"]["precision"]  # as `auto` chose
    accuracy = independent_accuracy(
        model,
        [single.noisy_images("val", {s: p[i : i + 5000] for s, p in positions.items()}) for i in range(0, 58001, 5000)],
        MixedPrecision(precision, "cpu") if precision == "bf16-mixed" else None,
    )
    metrics = torch.load(tmp_path / "metrics.pt")
    assert torch.allclose(
        torch.tensor(metrics["val/acc"], dtype=torch.float64), accuracy, atol=1e-6
    )  # summed over ranks, then divided
