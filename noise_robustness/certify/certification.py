"""Certifying finished studies: randomized smoothing of every member (``certify/smoothing.py``), resumable, reported.

``python -m noise_robustness certify --out <study> [--out ...]``: ``cli.py`` parses the command and
calls ``plan`` (every check, nothing created), then ``run``. A study's certification lives in
``<study>/certify/<setting>/``, named after its setting (n0, n, α, images, σ), so that two settings
never mix or overwrite each other:

- ``certify.yaml``: the setting and the ``study_id`` of the weights certified;
- ``members/sigma=<σ>/seed=<s>.csv``: one row per certified image (in the subset's order), rewritten
  atomically every ``SAVE_EVERY`` images: a rerun of the same command resumes from the last saved
  image, to the same numbers (the noise of every sample is a pure function of its key);
- ``summary.md`` and ``certified_accuracy.png``: certified accuracy against L2 radius, every study of
  the command side by side (one panel per network); the member curves go to the study's TensorBoard.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from noise_robustness import evaluation
from noise_robustness.certify import report
from noise_robustness.certify.smoothing import Votes, certificate
from noise_robustness.corruptions import GAUSSIAN
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.evaluation import SUBSET_SEED, subset  # subset: the images certified
from noise_robustness.files import DamagedFile, csv_text, integers, read_rows, write_atomic
from noise_robustness.study.folder import Study
from noise_robustness.study.members import Member, network_name, sigma_text
from noise_robustness.study.text import say

SAVE_EVERY = 20  # images between saves of the members' rows
# each member's rows: the columns and their types (``files.read_rows`` checks them whole before they are used)
COLUMNS = {"image": int, "label": int, "predict": int, "prediction": int, "correct": int, "count": int,
           "counts": integers, "p_lower": float, "radius": float}  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """What decides a certification's numbers (besides the study): Cohen et al.'s n0, n and α, how many
    validation images, and the smoothing σ (None: each member's training σ; members trained clean are skipped).
    The defaults are the command's (``StudyTrainer.certify``)."""

    n0: int
    n: int
    alpha: float
    images: int
    sigma: float | None

    def check(self) -> None:
        """Raises ValueError naming the first option out of its range."""
        for name in ("n0", "n", "images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"Expected `alpha` to be in (0, 1), but got {self.alpha}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(
                f"Expected `sigma` to be a finite number > 0 (or null: each member's), but got {self.sigma}"
            )

    @property
    def name(self) -> str:
        """The certification's folder name, e.g. ``n0=100,n=1000,alpha=0.001,images=200,sigma=trained``."""
        sigma = "trained" if self.sigma is None else sigma_text(self.sigma)
        return f"n0={self.n0},n={self.n},alpha={self.alpha:g},images={self.images},sigma={sigma}"

    @staticmethod
    def record_like() -> dict:
        """A record of the kind ``certify.yaml`` holds, whatever its setting: what one is checked against."""
        return Setting(1, 1, 0.5, 1, None).record("")

    def record(self, study_id: str) -> dict:
        return {"n0": self.n0, "n": self.n, "alpha": self.alpha, "images": self.images, "sigma": self.sigma,
                "subset_seed": SUBSET_SEED, "study_id": study_id}  # fmt: skip


@dataclass
class Certification:
    """One study's certification: its members to certify, with their smoothing σ and final weights."""

    study: Study
    setting: Setting
    members: list[Member]
    sigmas: list[float]
    weights: list[dict[str, torch.Tensor]]

    @property
    def folder(self) -> Path:
        return self.study.out / "certify" / self.setting.name

    @property
    def network(self) -> str:
        return network_name(self.study.resolved["model"]["net"]["class_path"])

    def rows_file(self, member: Member) -> Path:
        return self.folder / "members" / f"{member.name}.csv"

    def read_rows(self, member: Member) -> list[dict]:
        """The member's rows, checked whole (``files.read_rows``: DamagedFile otherwise)."""
        return read_rows(self.rows_file(member), COLUMNS)

    def saved_rows(self, member: Member, positions: list[int]) -> list[dict]:
        """The member's rows saved so far, if whole and the subset's first images (else none: certify anew)."""
        try:
            rows = self.read_rows(member)
        except FileNotFoundError:
            return []
        except DamagedFile as err:
            say("certify", f"{err}: certifying its member anew")
            return []
        if [int(r["image"]) for r in rows] != positions[: len(rows)]:
            say(
                "certify",
                f"{self.rows_file(member)} is not a saved part of this certification: certifying its member anew",
            )
            return []
        return rows


def plan(folders: list[str], setting: Setting) -> list[Certification]:
    """Checks the command: its setting, and that each folder is a finished study with its members' final weights.
    Creates nothing.

    Raises:
        ValueError: naming the option or folder and what is wrong.
    """
    setting.check()
    certifications = []
    for study in evaluation.finished_studies(folders, setting.images):
        # members trained on Gaussian noise (or clean, smoothed at a named σ); other corruptions' are not certified
        members = [
            m for m in study.members if m.corruption == GAUSSIAN and (setting.sigma is not None or m.noise_scale > 0)
        ]
        if not members:
            raise ValueError(
                f"Expected {study.out} to hold members trained on Gaussian noise (σ > 0), whose σ smooths them, but "
                "none is: name the smoothing σ with --sigma to certify its clean members"
            )
        sigmas = [setting.sigma if setting.sigma is not None else m.noise_scale for m in members]
        certification = Certification(study, setting, members, sigmas, evaluation.member_weights(study, members))
        evaluation.check_folder(certification.folder, "certify.yaml", setting.record(study.study_id))
        certifications.append(certification)
    if len({c.network for c in certifications}) != len(certifications):
        raise ValueError(f"Expected `out` to name studies of different networks, but got {folders}")
    return certifications


def certify_study(certification: Certification, data_dir: str, device: torch.device) -> None:
    """Certifies the study's members not finished yet, side by side, resuming from their saved rows."""
    setting, folder = certification.setting, certification.folder
    datamodule = evaluation.study_data(certification.study, data_dir, setting.images)
    positions = subset(datamodule.split_size("val"), setting.images)
    saved = {m: certification.saved_rows(m, positions) for m in certification.members}
    todo = [k for k, m in enumerate(certification.members) if len(saved[m]) < setting.images]
    if not todo:
        say("certify", f"{folder}: every member certified earlier")
        return
    (folder / "members").mkdir(parents=True, exist_ok=True)
    with evaluation.locked(folder, "certifying"):
        certify_members(certification, todo, saved, datamodule, positions, device)


def certify_members(
    certification: Certification,
    todo: list[int],
    saved: dict[Member, list[dict]],
    datamodule: NoisyMNISTDataModule,
    positions: list[int],
    device: torch.device,
) -> None:
    """Certifies the members at positions ``todo`` side by side, from the first image one of them lacks, saving
    their rows every ``SAVE_EVERY`` images."""
    setting, folder = certification.setting, certification.folder
    data = certification.study.resolved.get("data", {})
    write_atomic(folder / "certify.yaml", yaml.safe_dump(setting.record(certification.study.study_id)))
    members = [certification.members[k] for k in todo]
    sigmas = [certification.sigmas[k] for k in todo]
    net = evaluation.members_net(certification.study, members, [certification.weights[k] for k in todo], device)
    votes = Votes(net, [m.seed for m in members], sigmas, bool(data.get("clip", False)), device, datamodule.classes)
    start = min(len(saved[m]) for m in members)
    rows = {m: saved[m][:start] for m in members}
    file, indices = datamodule.splits["val"]
    say("certify", f"{folder}: {len(members)} member(s) side by side, images {start + 1} to {setting.images}")
    began = time.perf_counter()
    for i in range(start, setting.images):
        index = int(indices[positions[i]])
        image = datamodule.images[file][index].to(device).float().div_(255)
        label = int(datamodule.file_labels[file][index])
        selection = votes.count(image, file, index, "selection", setting.n0).cpu()
        estimation = votes.count(image, file, index, "estimation", setting.n).cpu()
        for k, member in enumerate(members):
            answer = certificate(selection[k], estimation[k], setting.alpha, sigmas[k])
            rows[member].append(
                {
                    "image": positions[i],
                    "label": label,
                    "predict": answer.predict,
                    "prediction": answer.prediction,
                    "correct": int(answer.prediction == label),
                    "count": answer.counts[answer.chosen],
                    "counts": " ".join(map(str, answer.counts)),
                    "p_lower": repr(answer.p_lower),
                    "radius": repr(answer.radius),
                }
            )
        if (i + 1) % SAVE_EVERY == 0 or i + 1 == setting.images:
            for member in members:
                path = certification.rows_file(member)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, csv_text(COLUMNS, rows[member]))
            seconds = time.perf_counter() - began
            rate = (i + 1 - start) / seconds
            say(
                "certify",
                f"{i + 1}/{setting.images} images ({rate:.2f}/s for each of {len(members)} members: "
                f"{rate * len(members):.1f} member-images/s)",
            )


def run(certifications: list[Certification], data_dir: str, device: torch.device) -> None:
    """Certifies every study of the command, then writes the report into each study's certification."""
    for certification in certifications:
        certify_study(certification, data_dir, device)
    report.write(certifications)
