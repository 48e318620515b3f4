"""DDP over gloo on the CPU, from the real command line: more processes change the speed, not the science."""

import subprocess
import sys
from pathlib import Path

import torch

from noise_robustness.classifier import NoiseClassifier
from noise_robustness.data import NoisyMNISTDataModule

REPO = Path(__file__).parents[1]
HOLDOUT = 58_001  # leaves 1,999 training images: shards of 1,000 and 999, and 58,001 validation images


def test_two_processes_split_every_epoch_exactly_and_agree_with_one(data_dir, tmp_path):
    command = [
        sys.executable, "-m", "noise_robustness", "fit",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        "--trainer.callbacks+=tests.ddp_probe.RecordBatches", f"--trainer.callbacks.out={tmp_path}",
        f"--data.data_dir={data_dir}", f"--data.val_holdout={HOLDOUT}",
        "--data.noise_scale=0.5", "--data.noise_mode=resample",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    single = NoisyMNISTDataModule(data_dir=data_dir, val_holdout=HOLDOUT, noise_scale=0.5, noise_mode="resample")
    single.setup("fit")
    for epoch in range(2):
        ranks = [torch.load(tmp_path / f"rank{r}_epoch{epoch}.pt") for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == 8  # same step count on both ranks
        positions = torch.cat([torch.cat(r["indices"]) for r in ranks])
        assert torch.equal(positions.sort().values, torch.arange(1999))  # disjoint, and all of the split once
        for rank in ranks:  # the noisy images each rank saw are the single-process ones
            for idx, images in zip(rank["indices"], rank["images"]):
                assert torch.equal(images, single.train_images(epoch)[idx])

    runs = list((tmp_path / "tb_logs").glob("*/version_*"))
    assert [p.name for p in runs] == ["version_0"]  # one run folder, not one per rank
    model = NoiseClassifier.load_from_checkpoint(runs[0] / "checkpoints" / "last.ckpt").eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x in single.eval_images["val"].split(5000)])
        loss = torch.nn.functional.cross_entropy(model(single.eval_images["val"]), single.split_labels("val"))
    metrics = torch.load(tmp_path / "metrics.pt")
    assert metrics["val/acc"] == (predictions == single.split_labels("val")).float().mean().item()
    assert abs(metrics["val/loss"] / loss.item() - 1) < 1e-4  # float32 sums in another order
