"""The Python API: the same command, called with plain arguments, returning what the study wrote."""

import pytest
import torch

from noise_robustness import api
from tests.conftest import rows


def test_a_sweep_from_python_returns_the_rows_its_folder_holds_and_resumes_it(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    options = [
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    study = api.sweep(out, scales=[0, 1.0], seeds=[0], epochs=1, data_dir=data_dir, options=options)
    written = rows(out / "results.csv")
    assert [(r["noise_scale"], r["seed"]) for r in study.results] == [(0.0, 0), (1.0, 0)]
    assert [r["val_acc"] for r in study.results] == [float(r["val_acc"]) for r in written]
    assert study.summary == (out / "summary.md").read_text() and study._repr_markdown_() == study.summary
    assert study.figure().is_file()
    matrix = study.matrix()  # trained on σ -> evaluated at σ -> accuracy (one seed: its own)
    assert set(matrix) == {("gaussian", 0.0), ("gaussian", 1.0)} and all(len(row) == 2 for row in matrix.values())
    written_cells = rows(out / "robustness.csv")
    expected = {(r["train_noise_scale"], r["eval_noise_scale"]): float(r["acc"]) for r in written_cells}
    assert {(t[1], e[1]): acc for t, row in matrix.items() for e, acc in row.items()} == {
        (float(t), float(e)): acc for (t, e), acc in expected.items()
    }
    assert api.load(out) == study
    ece = {(t[1], e[1]): value for t, row in study.calibration().items() for e, value in row.items()}
    assert ece == {
        (float(r["train_noise_scale"]), float(r["eval_noise_scale"])): float(r["ece"]) for r in written_cells
    }
    capsys.readouterr()
    again = api.sweep(out, scales=[0, 1.0], seeds=[0], epochs=1, data_dir=data_dir, options=options)
    assert (
        again == study and "every member of this command finished earlier" in capsys.readouterr().err
    )  # not retrained


def test_a_bad_option_from_python_is_an_exception_not_an_exit(data_dir, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="exit code 2"):
        api.sweep(tmp_path / "study", scales=[-1.0], data_dir=data_dir)
    assert "scales" in capsys.readouterr().err and not (tmp_path / "study").exists()


def test_noisy_images_are_the_clean_ones_plus_each_sigma_times_one_pattern(data_dir):
    images = api.noisy_images([0.0, 0.5, 1.0], count=4, data_dir=data_dir)
    assert images.shape == (3, 4, 1, 28, 28)
    clean = images[0]
    assert clean.min() >= 0 and clean.max() <= 1
    torch.testing.assert_close(images[2] - clean, 2 * (images[1] - clean), rtol=0, atol=1e-5)  # σ z, one z per seed


def test_a_member_recorded_before_its_ece_was_measured_loads_as_none(tmp_path):
    """A study trained before calibration was measured, gathered since: its ``ece`` cells are empty."""
    (tmp_path / "results.csv").write_text("network,noise_scale,seed,val_acc\nDropoutMLP,0.0,0,0.9\n")
    (tmp_path / "robustness.csv").write_text(
        "network,seed,train_noise_scale,eval_noise_scale,acc,ece\nDropoutMLP,0,0.0,0.0,0.9,\n"
    )
    (tmp_path / "summary.md").write_text("")
    study = api.load(tmp_path)
    assert study.robustness[0]["ece"] is None and study.calibration() == {}
