"""Which members a command trains: `--members` for a run, the study's choice for a sweep, and the checkpoint's record
of them, checked before a resume."""

import pytest
import torch

from noise_robustness.cli import cli_main
from noise_robustness.training import checkpoints
from tests.conftest import exits_with_error, short_run, tiny


def test_a_run_trains_the_members_it_names_in_the_studys_order(data_dir, tmp_path):
    options = ["--scales=[0, 0.5]", "--seeds=[0, 1]", "--members=[sigma=0.5/seed=1, sigma=0/seed=1]"]
    cli = cli_main(short_run(data_dir, tmp_path, "fit", *options))
    assert [m.name for m in cli.model.members] == ["sigma=0/seed=1", "sigma=0.5/seed=1"]
    assert [m.name for m in cli.datamodule.members] == ["sigma=0/seed=1", "sigma=0.5/seed=1"]


@pytest.mark.parametrize(
    "members, message",
    [
        ("[sigma=2/seed=0]", "Expected `members` to name members of the study once each"),
        ("[]", "Expected `members` to name members of the study once each"),
    ],
)
def test_members_outside_the_study_or_none_are_refused(members, message, data_dir, tmp_path, capsys):
    err = exits_with_error(short_run(data_dir, tmp_path, "fit", "--scales=[0, 0.5]", f"--members={members}"), capsys)
    assert message in err and not (tmp_path / "tb_logs").exists()


def test_a_sweep_chooses_its_members_itself(data_dir, tmp_path, capsys):
    err = exits_with_error(tiny(data_dir, tmp_path / "study", "--members=[sigma=0/seed=0]"), capsys)
    assert "`members` is chosen by the study" in err and not (tmp_path / "study").exists()


def test_torchs_own_path_refuses_the_engines_mask_option(data_dir, tmp_path, capsys):
    options = ["--model.fast=false", "--model.dropout_masks=per_member"]
    err = exits_with_error(short_run(data_dir, tmp_path, "fit", *options), capsys)
    assert "`dropout_masks` chooses the engine's masks; `fast` false draws torch's own" in err


def saved(tmp_path, members: list[str] | None, metrics: int = 2):
    """A checkpoint file with a record of ``members`` (None: a record written before the names were kept)."""
    checkpoint = {"state_dict": {"w": torch.zeros(metrics)}}
    checkpoints.record(checkpoint, {"model.lr": 0.001}, {"val/acc": torch.zeros(metrics)}, members or [], [])
    if members is None:
        del checkpoint[checkpoints.RECORD]["members"]
        checkpoint[checkpoints.RECORD]["checksum"] = checkpoints.checksum(checkpoint)
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_resume_checks_the_members_the_checkpoint_holds_in_any_order(tmp_path):
    identity = {"model.lr": 0.001}
    path = saved(tmp_path, ["sigma=0.5/seed=0", "sigma=0/seed=1"])
    checkpoints.verify(path, identity, set(), "fix", ["sigma=0/seed=1", "sigma=0.5/seed=0"])  # the same members
    with pytest.raises(ValueError, match=r"holds the state of other members \(sigma=0.5/seed=0, sigma=0/seed=1\)"):
        checkpoints.verify(path, identity, set(), "fix", ["sigma=0/seed=1", "sigma=1/seed=0"])
    older = saved(tmp_path, None, metrics=3)  # before the names: checked by the count of its metrics
    checkpoints.verify(older, identity, set(), "fix", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"holds the state of 3 member\(s\), not of the 2 this command trains"):
        checkpoints.verify(older, identity, set(), "fix", ["a", "b"])


@pytest.mark.slow  # three short studies
def test_an_extension_interrupted_after_its_checkpoint_resumes_from_it(data_dir, tmp_path, capsys):
    """A study extended by a σ and a seed at once trains its three new members in the order of their product (σ 0.5
    seed 0, σ 0.5 seed 1, σ 0 seed 1), not the study's; a rerun that finds their checkpoint resumes it all the same."""
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, scales="[0]", seeds="[0]", batches=2))
    extended = tiny(data_dir, out, scales="[0, 0.5]", seeds="[0, 1]", batches=2)
    cli_main(extended)
    new = [out / "members" / f"{name}.json" for name in ("sigma=0.5/seed=0", "sigma=0/seed=1", "sigma=0.5/seed=1")]
    for path in new:  # as if stopped after the last epoch's checkpoint, before the members' files
        path.unlink()
    capsys.readouterr()
    cli_main(extended)
    assert all(path.is_file() for path in new)
    assert "training 3 member(s) side by side (1 of 4 finished earlier)" in capsys.readouterr().err
