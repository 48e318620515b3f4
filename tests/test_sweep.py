"""The study as one model: its folder, identity, resume, extension, cluster tasks and report, on real MNIST."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2
from torchmetrics.classification import MulticlassCalibrationError

from noise_robustness.calibration import SUMS, expected_calibration_error
from noise_robustness.cli import cli_main
from noise_robustness.study.folder import RESULT_COLUMNS, ROBUSTNESS_COLUMNS
from noise_robustness.study.members import Member
from tests.conftest import METRICS, events, exits_with_error, independent_accuracy, member_rows, rows, tiny

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory) -> Path:
    """A finished tiny study (2 σ x 2 seeds, resampled noise), made once for the tests that read it."""
    out = tmp_path_factory.mktemp("tiny") / "study"
    cli_main(tiny(data_dir, out, "--data.noise_mode=resample", seeds="[0, 1]"))
    return out


def test_a_study_writes_one_row_per_member_with_the_options_it_ran_with(study):
    results = rows(study / "results.csv")
    assert [r["_columns"] for r in results] == [RESULT_COLUMNS] * 4
    assert [(r["network"], float(r["noise_scale"]), int(r["seed"]), r["noise_mode"], r["epochs"]) for r in results] == [
        ("DropoutMLP", 0.0, 0, "resample", "1"),
        ("DropoutMLP", 1.0, 0, "resample", "1"),
        ("DropoutMLP", 0.0, 1, "resample", "1"),
        ("DropoutMLP", 1.0, 1, "resample", "1"),
    ]  # the options it ran with, never a second copy of them
    assert all(0 <= float(r[k]) <= 1 for r in results for k in ("train_acc", "val_acc"))
    config = (study / "config.yaml").read_text()
    assert "noise_mode: resample" in config and "scales:" in config
    assert not (study / "tensorboard" / "config.yaml").exists()  # the study's config.yaml is in its folder


def test_the_robustness_diagonal_is_each_members_own_validation_accuracy(study):
    results, robustness = rows(study / "results.csv"), rows(study / "robustness.csv")
    assert robustness[0]["_columns"] == ROBUSTNESS_COLUMNS and len(robustness) == 8
    for r in results:  # the robustness pass (a test pass per σ) against the fit's last validation
        own = next(
            m
            for m in robustness
            if m["seed"] == r["seed"] and m["train_noise_scale"] == m["eval_noise_scale"] == r["noise_scale"]
        )
        assert float(own["acc"]) == pytest.approx(float(r["val_acc"]), abs=1e-6)


def test_the_robustness_pass_counts_what_an_independent_loop_counts(data_dir, tmp_path):
    out = tmp_path / "study"
    cli = cli_main(tiny(data_dir, out, "--data.val_holdout=1000", seeds="[0, 1]"))
    model, dm = cli.model, cli.datamodule
    cells = rows(out / "robustness.csv")
    recorded = {(float(r["train_noise_scale"]), int(r["seed"]), float(r["eval_noise_scale"])): r["acc"] for r in cells}
    ece = {(float(r["train_noise_scale"]), int(r["seed"]), float(r["eval_noise_scale"])): r["ece"] for r in cells}
    for scale in (0.0, 1.0):
        members = [Member(scale, m.seed) for m in model.members]
        batches = list(dm.loader("val", members))
        accuracy = independent_accuracy(model.to(dm.device), batches, cli.trainer.precision_plugin)
        with torch.inference_mode(), cli.trainer.precision_plugin.forward_context():
            logits = torch.cat([model(images) for images, _ in batches], dim=1).float()
        labels = torch.cat([labels for _, labels in batches], dim=1)
        for k, member in enumerate(model.members):
            # exactly: both count the correct images
            assert float(recorded[member.noise_scale, member.seed, scale]) == accuracy[k].item()
            # the calibration error of the same logits, as torchmetrics computes it
            reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(logits[k], labels[k])
            assert float(ece[member.noise_scale, member.seed, scale]) == pytest.approx(reference.item(), abs=1e-5)


def test_a_study_reports_a_summary_and_its_figures(study):
    for name in ("accuracy_vs_noise", "noise_preview", "robustness", "calibration"):
        with Image.open(study / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 300
    summary = (study / "summary.md").read_text()
    assert "seeds [0, 1] (mean ± std over 2 seeds)" in summary
    assert summary.index("| 0 (clean) |") < summary.index("| 1 |")
    assert "### DropoutMLP: calibration error, ECE (%), mean ± std over seeds [0, 1]" in summary


def test_each_members_calibration_bins_hold_its_accuracy_and_ece(study):
    """The bins a member's file keeps (for the reliability diagram) count every validation image once, their
    correct predictions are its accuracy and their gaps its ECE."""
    for path in study.glob("members/*/*.json"):
        for cell in json.loads(path.read_text())["robustness"]:
            images, confidence, correct = (
                torch.tensor(cell["calibration"][name], dtype=torch.float64) for name in SUMS
            )
            assert images.sum() == 10_000 and correct.sum() / images.sum() == pytest.approx(cell["acc"], abs=1e-12)
            assert expected_calibration_error(torch.stack([images, confidence, correct])[:, None]).item() == (
                pytest.approx(cell["ece"], abs=1e-12)
            )
            assert (confidence <= images).all() and (correct <= images).all()


def test_each_member_is_a_tensorboard_run_of_its_metrics_against_the_epoch(study):
    runs = {str(p.parent.relative_to(study / "tensorboard")) for p in study.glob("tensorboard/sigma=*/seed=*/events.*")}
    assert sorted(runs) == ["sigma=0/seed=0", "sigma=0/seed=1", "sigma=1/seed=0", "sigma=1/seed=1"]
    member = events(study / "tensorboard" / "sigma=1" / "seed=1")
    assert set(member.Tags()["scalars"]) == {"train/acc", "train/loss", "val/acc", "val/loss"}
    assert set(member.Tags()["images"]) == {"train/samples_clean_above_noisy", "val/samples_clean_above_noisy"}
    assert [s.step for s in member.Scalars("val/acc")] == [1]  # against the epoch
    assert member.Scalars("val/acc")[0].value == pytest.approx(float(member_rows(study)[(1.0, 1)]["val_acc"]))
    root = events(study / "tensorboard")
    assert set(root.Tags()["images"]) == {
        "study/accuracy_vs_noise",
        "study/noise_preview",
        "study/robustness",
        "study/calibration",
    }


def test_the_hparams_table_names_its_rows_after_the_members_and_shows_sigma_and_seed_first(study):
    member = events(study / "tensorboard" / "sigma=1" / "seed=1")
    content = member.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.group_name == "sigma=1/seed=1"  # the row's "Trial ID", as the run is named
    values = session.hparams
    assert (values["sigma"].number_value, values["seed"].string_value, values["epochs"].string_value) == (1.0, "1", "1")
    assert values["clip"].HasField("bool_value") and values["network"].string_value == "DropoutMLP"
    content = events(study / "tensorboard").SummaryMetadata("_hparams_/experiment").plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert [h.name for h in experiment.hparam_infos if h.differs] == ["sigma", "seed"]  # TensorBoard shows these first
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc", "train/acc", "val/loss", "train/loss"]


def test_rerunning_a_finished_study_trains_nothing_and_keeps_its_results(study, data_dir, capsys):
    results = rows(study / "results.csv")
    capsys.readouterr()
    cli_main(tiny(data_dir, study, "--data.noise_mode=resample", seeds="[0, 1]"))
    assert "every member of this command finished earlier" in capsys.readouterr().err
    assert rows(study / "results.csv") == results


@pytest.mark.parametrize(
    "change", ["--data.clip=true", "--data.val_holdout=5000", "--model.lr=0.01", "--trainer.limit_train_batches=7"]
)
def test_a_changed_option_is_refused_naming_the_keys(change, study, data_dir, capsys):
    out = study  # the module's finished study, whose command each change departs from
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    message = exits_with_error(tiny(data_dir, out, "--data.noise_mode=resample", change, seeds="[0, 1]"), capsys)
    key = change[2:].split("=")[0]
    assert f"{out} holds a study made with other options ({key}: " in message and "use a new --out" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing trained, nothing written


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_added_seeds_and_levels_train_only_the_new_members(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out))
    first = member_rows(out)
    finished = {p: p.stat().st_mtime_ns for p in (out / "members").rglob("*.json")}
    capsys.readouterr()
    cli_main(tiny(data_dir, out, scales="[0, 1.0, 2.0]", seeds="[0, 1]"))
    assert "training 4 member(s) side by side (2 of 6 finished earlier)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # reused, not retrained
    both = member_rows(out)
    assert set(both) == {(s, seed) for s in (0.0, 1.0, 2.0) for seed in (0, 1)}
    assert all(both[key] == first[key] for key in first)


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_cluster_tasks_train_one_seed_each_and_the_gather_names_what_is_missing(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    args = tiny(data_dir, out, seeds="[0, 1, 2]")
    for task in (2, 0):  # tasks finish in any order; task 1 "failed"
        cli_main([*args, f"--task={task}"])
    assert not (out / "summary.md").exists()  # a task leaves the report to the gather
    message = exits_with_error([*args, "--gather=true"], capsys)
    assert "2 of 6 members of" in message and "have no results: sigma=0/seed=1, sigma=1/seed=1" in message
    assert not (out / "summary.md").exists() and not (out / "results.csv").exists()  # never a report over missing rows
    cli_main([*args, "--task=1"])
    cli_main([*args, "--gather=true"])
    assert sorted(member_rows(out)) == [(s, seed) for s in (0.0, 1.0) for seed in (0, 1, 2)]
    assert (out / "accuracy_vs_noise.png").is_file()


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_compare_reports_another_networks_study_beside_this_one(data_dir, tmp_path, capsys):
    small = "--data.val_holdout=500"  # both studies: the compared one must see the same noisy data
    cnn, mlp = tmp_path / "cnn", tmp_path / "mlp"
    first_recipe = "--trainer.precision=null", "--model.dropout_masks=per_member"  # a recipe may differ, and is named
    cli_main(tiny(data_dir, cnn, small, "--model.net=noise_robustness.models.KerasCNN", *first_recipe, batches=2))
    (cnn / "results.csv").write_text("stale\n")  # a compared study is read from its members, never its csv
    cli_main(tiny(data_dir, mlp, small, f"--compare=[{cnn}]", batches=2))
    assert {r["network"] for r in rows(mlp / "results.csv")} == {"DropoutMLP"}  # its csv files: its own members
    assert {r["network"] for r in rows(mlp / "robustness.csv")} == {"DropoutMLP"}
    summary = (mlp / "summary.md").read_text()
    cnn_clean = 100 * json.loads((cnn / "members" / "sigma=0" / "seed=0.json").read_text())["result"]["val_acc"]
    mlp_clean = 100 * float(member_rows(mlp)[0.0, 0]["val_acc"])
    assert (
        f"| σ | DropoutMLP | KerasCNN |\n| ---: | ---: | ---: |\n| 0 (clean) | {mlp_clean:.2f} | {cnn_clean:.2f} |"
        in summary
    )
    assert summary.index("### DropoutMLP:") < summary.index("### KerasCNN:")  # this study first
    assert f"The study compared from {cnn} was trained otherwise: model.dropout_masks: 'per_member' there" in summary
    assert (
        Image.open(mlp / "robustness.png").size[0] > Image.open(cnn / "robustness.png").size[0]
    )  # a heatmap per network
    capsys.readouterr()
    cli_main(tiny(data_dir, mlp, small, batches=2))  # `compare` is not in the study's identity: reported alone
    assert "every member of this command finished earlier" in capsys.readouterr().err
    assert "KerasCNN" not in (mlp / "summary.md").read_text()


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_compare_refuses_studies_that_cannot_stand_beside_this_one(data_dir, tmp_path, capsys):
    cnn, mlp, unfinished = tmp_path / "cnn", tmp_path / "mlp", tmp_path / "unfinished"
    cli_main(tiny(data_dir, cnn, "--model.net=noise_robustness.models.KerasCNN", batches=2, scales="[0]"))
    cli_main(tiny(data_dir, mlp, scales="[0]", batches=2))
    unfinished.mkdir()  # a study whose members have not all been trained
    for name in ("study.yaml", "config.yaml"):
        (unfinished / name).write_text((cnn / name).read_text())
    cases = [
        (
            [f"--compare=[{mlp}]"],
            f"Expected `compare` to name studies of other networks, but {mlp} is a study of "
            "noise_robustness.models.DropoutMLP too",
        ),
        (
            [f"--compare=[{unfinished}]"],
            f"Expected the study in {unfinished} (`compare`) to be finished, but 1 of 1 members of {unfinished} "
            "have no results: sigma=0/seed=0",
        ),
        (
            ["--data.noise_mode=resample", f"--compare=[{cnn}]"],
            f"Expected the study in {cnn} (`compare`) to differ from this one in its network (`model.net`) "
            "and its recipe (`model.fast`, `trainer.precision`, `model.dropout_masks`, `model.compiled`) alone, "
            "but data.noise_mode: 'fixed' there, 'resample' here",
        ),
        (  # trained for other batches: the same "epochs 1" would stand side by side
            ["--trainer.limit_train_batches=5", f"--compare=[{cnn}]"],
            f"Expected the study in {cnn} (`compare`) to differ from this one in its network (`model.net`) "
            "and its recipe (`model.fast`, `trainer.precision`, `model.dropout_masks`, `model.compiled`) alone, "
            "but trainer.limit_train_batches: 2.0 there, 5.0 here",
        ),
    ]
    for args, message in cases:
        new = tmp_path / "new"
        assert message in exits_with_error(tiny(data_dir, new, *args, batches=2), capsys)
        assert not new.exists()


def test_a_member_in_training_elsewhere_is_not_trained_twice(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, scales="[0]"))
    (out / "locks").mkdir(exist_ok=True)
    with open(out / "locks" / "sigma=1,seed=0.lock", "a") as lock:  # another command holds this member
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = exits_with_error(tiny(data_dir, out, scales="[0, 1.0]"), capsys)
    assert f"Another command is training member sigma=1/seed=0 of {out}" in message
    assert not (out / "members" / "sigma=1").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_result_files_are_as_readable_as_the_umask_allows(umask, data_dir, tmp_path):
    old = os.umask(umask)
    try:
        cli_main(tiny(data_dir, tmp_path / "study", scales="[0]"))
    finally:
        os.umask(old)
    for name in ("results.csv", "robustness.csv", "study.yaml", "config.yaml", "members/sigma=0/seed=0.json"):
        assert (tmp_path / "study" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def start_sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "noise_robustness", *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("graphed", [False, True])
def test_a_study_stopped_by_sigterm_resumes_to_the_same_numbers(graphed, data_dir, tmp_path):
    args = ["--epochs=4", "--data.noise_mode=resample"]
    # graphed: blocks of 16 batches (Lightning counts blocks), so whole epochs of 30 larger batches
    args, batches = (args + ["--model.graphed=true", "--data.batch_size=2000"], None) if graphed else (args, 40)
    reference = tmp_path / "reference"
    cli_main(tiny(data_dir, reference, *args, seeds="[0, 1]", batches=batches))
    out = tmp_path / "stopped"
    study = start_sweep(tiny(data_dir, out, *args, seeds="[0, 1]", batches=batches))
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/*/last.ckpt")):  # the end of epoch 1
        assert study.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    study.send_signal(signal.SIGTERM)  # during epoch 2, as a cluster's time limit would
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert "[sweep] stopped by SIGTERM: rerun the same command to resume" in stderr
    assert not (out / "members").exists()  # it really stopped mid-study
    cli_main(tiny(data_dir, out, *args, seeds="[0, 1]", batches=batches))
    resumed, uninterrupted = member_rows(out), member_rows(reference)
    for key, row in uninterrupted.items():
        assert {m: resumed[key][m] for m in METRICS} == {m: row[m] for m in METRICS}, key  # bit for bit on the CPU


@pytest.mark.slow
def test_a_member_after_one_epoch_scores_as_its_fit_alone(data_dir, tmp_path):
    cli_main(tiny(data_dir, tmp_path / "study", scales="[0, 0.5, 2.0]", seeds="[0, 4]", batches=None))
    alone = cli_main(
        ["fit", "--scales=[0.5]", "--seeds=[4]", "--trainer.max_epochs=1", f"--data.data_dir={data_dir}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    member = member_rows(tmp_path / "study")[(0.5, 4)]
    assert abs(float(member["val_acc"]) - alone.trainer.callback_metrics["val/acc"].item()) < 0.003
    record = json.loads((tmp_path / "study" / "members" / "sigma=0.5" / "seed=4.json").read_text())
    assert record["result"]["study_id"] == member["study_id"]
