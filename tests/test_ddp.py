"""DDP over gloo on the CPU, from the real command line: more processes change the speed, not the science."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from noise_robustness.cli import cli_main
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.training.classifier import NoiseClassifier
from tests.conftest import METRICS, independent_accuracy, member_rows, rows, tiny

REPO = Path(__file__).parents[1]
HOLDOUT = 58_000  # leaves 2,000 training images: 15 batches of 128 and one of 80, each split in two; 58,000 to validate
SCALES, SEEDS = [0.0, 0.5], [0, 1]


@pytest.mark.slow
def test_two_processes_split_every_batch_exactly_and_agree_with_one(data_dir, tmp_path):
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
            assert len(ranks[0]["positions"][seed]) == len(ranks[1]["positions"][seed]) == 16  # one process's steps
            for step in range(16):  # each process a half of each of one process's batches, in order
                batch = torch.cat([r["positions"][seed][step] for r in ranks])
                assert len(ranks[0]["positions"][seed][step]) == len(batch) // 2
                assert torch.equal(batch, single.loader("train", shuffle=True).batches(epoch, 0, 1)[seed][step])
            positions = torch.cat([torch.cat(r["positions"][seed]) for r in ranks])
            assert torch.equal(positions.sort().values, torch.arange(2000))  # disjoint, and all of the split once
        for rank in ranks:  # the noisy images each rank saw are the single-process ones
            for step, images in enumerate(rank["images"]):
                expected, _ = single.noisy_images("train", {s: rank["positions"][s][step] for s in SEEDS}, epoch=epoch)
                assert torch.equal(images, expected)

    runs = list((tmp_path / "tb_logs").glob("*/version_*"))
    assert [p.name for p in runs] == ["version_0"]  # one run folder, not one per rank
    model = NoiseClassifier(scales=SCALES, seeds=SEEDS)
    model.load_state_dict(torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    positions = {s: torch.arange(single.split_size("val")) for s in SEEDS}
    checkpoint = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    (machine,) = checkpoint["noise_robustness"]["trained_on"]
    precision = machine["precision"]  # as `auto` chose
    accuracy = independent_accuracy(
        model,
        [single.noisy_images("val", {s: p[i : i + 5000] for s, p in positions.items()}) for i in range(0, 58000, 5000)],
        MixedPrecision(precision, "cpu") if precision == "bf16-mixed" else None,
    )
    metrics = torch.load(tmp_path / "metrics.pt")
    assert torch.allclose(
        torch.tensor(metrics["val/acc"], dtype=torch.float64), accuracy, atol=1e-6
    )  # summed over ranks, then divided


@pytest.mark.slow
def test_a_study_on_two_processes_trains_the_members_one_process_trains(data_dir, tmp_path, capsys):
    """Each member's gradient is the mean over its whole batch and its dropout masks and noise follow the image's
    place in the batch, not the process: the members of a 2-process study are the 1-process study's up to the
    summation order of their gradients (measured: after 20 fp32 steps, val_acc within 0.003; most members bit for
    bit). One set of files, written by the first process; a rerun trains nothing."""
    args = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.limit_train_batches=20"]
    cli_main(tiny(data_dir, tmp_path / "one", *args, scales="[0, 0.5, 2.0]", seeds="[0, 1]"))
    command = tiny(data_dir, tmp_path / "two", *args, "--trainer.devices=2", scales="[0, 0.5, 2.0]", seeds="[0, 1]")
    result = subprocess.run(
        [sys.executable, "-m", "noise_robustness", *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 6 member(s) side by side in 2 processes" in result.stderr
    one, two = member_rows(tmp_path / "one"), member_rows(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for key in one:
        for metric in METRICS:
            assert abs(float(one[key][metric]) - float(two[key][metric])) < 0.01, (key, metric)
    cells = [rows(tmp_path / folder / "robustness.csv") for folder in ("one", "two")]
    assert [len(c) for c in cells] == [18, 18]  # each member at each σ
    assert max(abs(float(a["acc"]) - float(b["acc"])) for a, b in zip(*cells)) < 0.01
    runs = [sorted(p.relative_to(tmp_path / f) for p in (tmp_path / f).rglob("seed=*")) for f in ("one", "two")]
    assert runs[0] == runs[1] and len(runs[0]) == 6 * 3  # per member: a TensorBoard run, its result and weights
    cli_main(command)  # a rerun in one process: nothing to train
    assert "every member of this command finished earlier" in capsys.readouterr().err


def test_processes_that_cannot_share_every_batch_evenly_are_refused_before_anything_is_made(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--trainer.accelerator=cpu", "--trainer.devices=3"]  # 128 images a batch do not split in three
    with pytest.raises(SystemExit) as exit:
        cli_main(tiny(data_dir, out, *args))
    assert exit.value.code == 2
    assert "Expected the training batches (128 images, the last 96) to split evenly over 3 processes" in (
        capsys.readouterr().err
    )
    assert not out.exists()
