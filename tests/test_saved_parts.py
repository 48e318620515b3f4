"""A saved part cut short, emptied or damaged is found, named and redone (or refused, naming it), never read as
numbers: the rows of ``certify`` and ``attack``, their records, a member's result file, on a real evaluated study.

Every file is checked at every byte offset of its last row through the one reader (``files.read_rows``,
``files.read_record``); each file kind is then cut once inside its last row and the real command rerun, ending with
the files an uninterrupted run wrote, byte for byte; the slow tier reruns the commands at every offset.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from noise_robustness.attacks.attack import ACCURACY_COLUMNS, SMOOTHADV_COLUMNS
from noise_robustness.certify.certification import COLUMNS as CERTIFIED
from noise_robustness.cli import cli_main
from noise_robustness.files import DamagedFile, read_record, read_rows
from noise_robustness.study.folder import Study
from noise_robustness.study.members import Member
from tests.conftest import exits_with_error, tiny

CERTIFY = ["--n0=10", "--n=40", "--images=4"]
ATTACK = ["--images=4", "--steps=2", "--linf=[0.1]", "--l2=[1.0]", "--smoothadv_steps=1", "--smoothadv_samples=2"]
CERTIFICATION = "certify/n0=10,n=40,alpha=0.001,images=4,sigma=trained"
ATTACKED = (
    "attack/images=4,steps=2,linf_step=0.01,l2_step=2.5eps_over_steps,random_start=false,losses=ce+margin,smoothadv=1x2"
)
ROWS = {  # each kind of csv an evaluation writes and reads back: its file in the study, its columns
    "certified": (f"{CERTIFICATION}/members/sigma=0.5/seed=0.csv", CERTIFIED),
    "accuracy": (f"{ATTACKED}/accuracy.csv", ACCURACY_COLUMNS),
    "smoothadv": (f"{ATTACKED}/smoothadv.csv", SMOOTHADV_COLUMNS),
}
RECORDS = {"certify": f"{CERTIFICATION}/certify.yaml", "attack": f"{ATTACKED}/attack.yaml"}


def commands(data_dir, out: Path) -> dict[str, list[str]]:
    where = [f"--out={out}", f"--data.data_dir={data_dir}"]
    return {"certify": ["certify", *where, *CERTIFY], "attack": ["attack", *where, *ATTACK]}


@pytest.fixture(scope="module")
def evaluated(data_dir, tmp_path_factory) -> Path:
    """A finished study (σ = 0 and 0.5, one seed, 5 batches), certified, then attacked (PGD and SmoothAdv)."""
    out = tmp_path_factory.mktemp("saved") / "study"
    cli_main(tiny(data_dir, out, scales="[0, 0.5]"))
    for command in commands(data_dir, out).values():
        cli_main(command)
    return out


def evaluation_files(out: Path) -> dict[str, bytes]:
    """Every file ``certify`` and ``attack`` wrote (their locks aside), by path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for folder in ("certify", "attack")
        for p in sorted((out / folder).rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def last_row_cuts(text: str) -> range:
    """Every offset at which a cut leaves the last row incomplete, from its first byte to its line end."""
    return range(text.rindex("\n", 0, len(text) - 1) + 1, len(text))


@pytest.mark.parametrize("kind", ROWS)
def test_a_csv_cut_anywhere_in_its_last_row_is_damaged_and_at_its_start_holds_whole_rows(kind, evaluated, tmp_path):
    name, columns = ROWS[kind]
    text = (evaluated / name).read_text()
    whole = read_rows(evaluated / name, columns)
    cut = tmp_path / "cut.csv"
    for offset in last_row_cuts(text):
        cut.write_text(text[:offset])
        if offset == last_row_cuts(text).start:  # at a row's end: the rows before it, whole
            assert read_rows(cut, columns) == whole[:-1]
            continue
        with pytest.raises(DamagedFile, match=f"{cut} is damaged"):
            read_rows(cut, columns)
    for damaged in (
        "",
        text.replace(",", ";", 1),
        text[:-1] + "x\n",
        text.replace("\n", ",\n").replace(",\n", "\n", 1),
    ):
        cut.write_text(damaged)  # emptied, another header, a field of another type, a field too many
        with pytest.raises(DamagedFile, match=f"{cut} is damaged"):
            read_rows(cut, columns)


@pytest.mark.parametrize("kind", RECORDS)
def test_a_record_cut_anywhere_is_damaged(kind, evaluated, tmp_path):
    text = (evaluated / RECORDS[kind]).read_text()
    record = yaml.safe_load(text)
    cut = tmp_path / "record.yaml"
    for offset in range(len(text) - 1):  # all but the last line end
        cut.write_text(text[:offset])
        with pytest.raises(DamagedFile, match=f"{cut} is damaged"):
            read_record(cut, record)
    cut.write_text(text[:-1])
    assert read_record(cut, record) == record


def test_a_member_result_cut_anywhere_in_its_last_lines_is_no_result(evaluated, tmp_path):
    study = Study.open(evaluated)
    member = Member(0.5, 0)
    text = study.result_file(member).read_text()
    copy = Study(tmp_path, study.identity, study.members)
    copy.result_file(member).parent.mkdir(parents=True)
    for offset in range(len(text) - 300, len(text)):
        copy.result_file(member).write_text(text[:offset])
        assert copy.read_member(member) is None and not copy.finished(member)


DAMAGES = {  # a file of the study, how it is damaged, and the command rerun
    "certified row cut in its radius": (ROWS["certified"][0], lambda text: text[:-2], "certify"),
    "accuracy row cut in its acc": (ROWS["accuracy"][0], lambda text: text[:-2], "attack"),
    "accuracy emptied": (ROWS["accuracy"][0], lambda text: "", "attack"),
    "smoothadv row cut": (ROWS["smoothadv"][0], lambda text: text[: text.rindex(",")], "attack"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_part_is_named_and_redone_to_the_same_files(damage, evaluated, data_dir, tmp_path, capsys):
    out = shutil.copytree(evaluated, tmp_path / "study")
    written = evaluation_files(out)
    name, cut, command = DAMAGES[damage]
    (out / name).write_text(cut((out / name).read_text()))
    folder = out / (CERTIFICATION if command == "certify" else ATTACKED)
    stale = folder / f".summary.md.tmp.999999999@{socket.gethostname()}.abcdefgh"  # a write killed half-way
    stale.write_text("half")
    capsys.readouterr()
    cli_main(commands(data_dir, out)[command])
    said = capsys.readouterr().err
    assert f"{out / name} is damaged" in said, said
    assert evaluation_files(out) == written
    assert not stale.exists()


@pytest.mark.parametrize("kind", RECORDS)
@pytest.mark.parametrize("content", ["attack_seed: 0\nimages: 1000\nl2_st", ""], ids=["cut", "empty"])
def test_a_damaged_record_is_refused_naming_it(kind, content, evaluated, data_dir, tmp_path, capsys):
    """The rows beside a damaged record may be of other weights: refused, with the remedy, before anything runs."""
    out = shutil.copytree(evaluated, tmp_path / "study")
    (out / RECORDS[kind]).write_text(content)
    message = exits_with_error(commands(data_dir, out)[kind], capsys)
    assert f"{out / RECORDS[kind]} is damaged" in message and "move " in message and "Traceback" not in message
    assert len([line for line in message.splitlines() if "is damaged" in line]) == 1  # after the parser's usage


@pytest.mark.slow  # a command rerun for every byte of each last row: minutes
@pytest.mark.parametrize("kind", ROWS)
def test_every_cut_of_a_last_row_ends_in_the_same_files(kind, evaluated, data_dir, tmp_path, capsys):
    name, _ = ROWS[kind]
    command = "certify" if kind == "certified" else "attack"
    out = shutil.copytree(evaluated, tmp_path / "study")
    written, text = evaluation_files(out), (out / name).read_text()
    for offset in last_row_cuts(text):
        (out / name).write_text(text[:offset])
        cli_main(commands(data_dir, out)[command])
        assert evaluation_files(out) == written, offset
    capsys.readouterr()


@pytest.mark.slow  # a child process, stopped as it loads
def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "noise_robustness", "sweep"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    try:
        process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        process.send_signal(2)  # SIGINT, as Ctrl-C sends it
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and stderr.strip().splitlines() == [
        "[sweep] stopped by SIGINT before it began: nothing was made; run it again"
    ]
    assert list(tmp_path.iterdir()) == []
