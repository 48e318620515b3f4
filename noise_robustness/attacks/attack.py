"""Attacking finished studies: PGD under L∞ and L2 of every member at once (``attacks/pgd.py``) and, for members that
``certify`` certified, SmoothAdv against their smoothed classifiers (``attacks/smoothadv.py``); resumable, reported.

``python -m noise_robustness attack --out <study> [--out ...]``: ``cli.py`` parses the command and calls ``plan``
(every check, nothing created), then ``run``. A study's attack lives in ``<study>/attack/<setting>/``, named after
what decides each attack's numbers (images, steps, step sizes, random start, losses, SmoothAdv's steps and samples);
the ε values are rows in it, so a command with more ε adds rows and never overwrites:

- ``attack.yaml``: the setting and the ``study_id`` of the weights attacked;
- ``accuracy.csv``: every member's accuracy on the images, clean (``norm`` none) and under each (norm, ε): under PGD
  with each loss, and ``worst``, the share of images no loss's attack flipped (the accuracy the report gives);
  rewritten atomically after each (norm, ε): a rerun of the same command resumes after the last one written;
- ``smoothadv.csv``: per certification of the study, each certified member's certified accuracy at each radius r of
  its summary and its smoothed classifier's accuracy under SmoothAdv at ε = r, on the certified images, written
  after each radius;
- ``summary.md`` and ``robust_accuracy.png`` (``attacks/report.py``).

The images are the first ``images`` of the seeded validation order ``certify`` takes its images from, so the certified
images are attacked too. Every attack runs in fp32 on the trainer's device, all members side by side.
"""

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from noise_robustness import evaluation
from noise_robustness.attacks import report
from noise_robustness.attacks.pgd import LOSSES, PGD, correct, robust_correct
from noise_robustness.attacks.smoothadv import smoothadv
from noise_robustness.certify.certification import COLUMNS as CERTIFIED
from noise_robustness.certify.certification import Setting as CertifySetting
from noise_robustness.certify.report import certified_accuracy, radii_of, summary_radii
from noise_robustness.certify.smoothing import Votes
from noise_robustness.data.noise import derive_seed, seeded
from noise_robustness.files import DamagedFile, csv_text, read_record, read_rows, write_atomic
from noise_robustness.study.folder import Study
from noise_robustness.study.members import network_name
from noise_robustness.study.text import say

# the files' columns and their types (``files.read_rows`` checks them whole before they are used)
ACCURACY_COLUMNS = {"network": str, "corruption": str, "noise_scale": float, "seed": int, "norm": str, "eps": float,
                    "loss": str, "images": int, "correct": int, "acc": float}  # fmt: skip
WORST = "worst"  # an accuracy.csv row's loss: the images that every loss's attack left right
SMOOTHADV_COLUMNS = {"certification": str, "network": str, "noise_scale": float, "seed": int, "sigma": float,
                     "radius": float, "images": int, "certified_acc": float, "smoothadv_acc": float}  # fmt: skip
L2_STEP_FACTOR = 2.5  # an L2 step of 2.5 ε / steps: Madry et al.'s `robustness` library's rule
ATTACK_SEED = 0  # the random starts' generators, one per attack
SMOOTHADV_IMAGES = 50  # images attacked at once by SmoothAdv (each member's m noisy copies of each, with gradients)


@dataclass(frozen=True)
class Setting:
    """An attack command's options (the defaults are ``StudyTrainer.attack``'s): the ε of each norm, PGD's steps and
    step sizes (``l2_step`` None: 2.5 ε / steps), its random start, the losses it climbs, how many validation images,
    and SmoothAdv's steps and noise samples per step."""

    linf: tuple[float, ...]
    l2: tuple[float, ...]
    steps: int
    linf_step: float
    l2_step: float | None
    random_start: bool
    losses: tuple[str, ...]
    images: int
    smoothadv_steps: int
    smoothadv_samples: int

    def attacks(self) -> list[tuple[str, float, list[PGD]]]:
        """Every (norm, ε) of the command, L∞ first, each ε in the order given, with its attack under each loss."""
        steps = {"linf": lambda eps: self.linf_step, "l2": self.l2_step_of}
        return [
            (norm, float(eps), [PGD(norm, eps, self.steps, steps[norm](eps), self.random_start, loss)
                                for loss in self.losses])
            for norm in ("linf", "l2")
            for eps in getattr(self, norm)
        ]  # fmt: skip

    def l2_step_of(self, eps: float) -> float:
        return L2_STEP_FACTOR * eps / self.steps if self.l2_step is None else self.l2_step

    def check(self) -> None:
        """Raises ValueError naming the first option out of its range."""
        for name in ("steps", "images", "smoothadv_steps", "smoothadv_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")
        for name in ("linf", "l2"):
            for eps in getattr(self, name):
                if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
                    raise ValueError(f"Expected every ε of `{name}` to be a finite number >= 0, but got {eps!r}")
        for name in ("linf_step", "l2_step"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value!r}")
        if not self.linf and not self.l2:
            raise ValueError("Expected `linf` or `l2` to name some ε, but both are empty")
        if not self.losses or set(self.losses) - set(LOSSES) or len(set(self.losses)) != len(self.losses):
            raise ValueError(f"Expected `losses` to name some of {LOSSES}, each once, but got {list(self.losses)}")

    @property
    def name(self) -> str:
        """The attack's folder name, e.g. ``images=1000,steps=40,linf_step=0.01,l2_step=2.5eps_over_steps,``
        ``random_start=false,losses=ce+margin,smoothadv=10x8`` (step sizes as Python writes them: never rounded)."""
        l2_step = f"{L2_STEP_FACTOR:g}eps_over_steps" if self.l2_step is None else repr(float(self.l2_step))
        return (
            f"images={self.images},steps={self.steps},linf_step={float(self.linf_step)!r},l2_step={l2_step},"
            f"random_start={str(self.random_start).lower()},losses={'+'.join(self.losses)},"
            f"smoothadv={self.smoothadv_steps}x{self.smoothadv_samples}"
        )

    def record(self, study_id: str) -> dict:
        """What ``attack.yaml`` records: what decides every number in the folder (not the ε, each a row)."""
        kept = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in ("linf", "l2")}
        return {**kept, "subset_seed": evaluation.SUBSET_SEED, "attack_seed": ATTACK_SEED, "study_id": study_id}


@dataclass
class Attack:
    """One study's attack: its members and their final weights, and the certifications to check against."""

    study: Study
    setting: Setting
    weights: list[dict[str, torch.Tensor]]
    certifications: list[Path]

    @property
    def folder(self) -> Path:
        return self.study.out / "attack" / self.setting.name

    @property
    def network(self) -> str:
        return network_name(self.study.resolved["model"]["net"]["class_path"])

    def read(self, name: str) -> list[dict]:
        """The rows of a csv file of the folder, checked whole: none if it is missing or damaged (named: redone)."""
        try:
            return read_rows(self.folder / name, SMOOTHADV_COLUMNS if name == "smoothadv.csv" else ACCURACY_COLUMNS)
        except FileNotFoundError:
            return []
        except DamagedFile as err:
            say("attack", f"{err}: redoing its rows")
            return []


def plan(folders: list[str], setting: Setting) -> list[Attack]:
    """Checks the command: its setting, and that each folder is a finished study with its members' final weights and
    no other attack of this name. Creates nothing.

    Raises:
        ValueError: naming the option or folder and what is wrong.
    """
    setting.check()
    attacks = []
    for study in evaluation.finished_studies(folders, setting.images):
        attack = Attack(study, setting, evaluation.member_weights(study, study.members), certifications(study))
        evaluation.check_folder(attack.folder, "attack.yaml", setting.record(study.study_id))
        attacks.append(attack)
    return attacks


def certifications(study: Study) -> list[Path]:
    """The study's finished certifications of its own weights (its record and every member's rows whole, a row for
    every image), by folder name; a damaged one is named and left until ``certify`` redoes it."""
    found = []
    for record in sorted((study.out / "certify").glob("*/certify.yaml")):
        try:
            recorded = read_record(record, CertifySetting.record_like())
        except DamagedFile as err:  # certify refuses it too: the rows beside it may be of other weights
            say("attack", f"{err}: SmoothAdv leaves its certification out (move {record.parent} away, certify again)")
            continue
        try:
            rows = [read_rows(path, CERTIFIED) for path in record.parent.glob("members/*/*.csv")]
        except DamagedFile as err:
            say("attack", f"{err}: SmoothAdv leaves its certification out until `certify`, rerun, redoes it")
            continue
        if recorded["study_id"] == study.study_id and rows and all(len(r) == recorded["images"] for r in rows):
            found.append(record.parent)
    return found


def run(attacks: list[Attack], data_dir: str, device: torch.device) -> None:
    """Attacks every study of the command, then writes each one's report."""
    for attack in attacks:
        datamodule = evaluation.study_data(attack.study, data_dir, attack.setting.images)
        attack.folder.mkdir(parents=True, exist_ok=True)
        with evaluation.locked(attack.folder, "attacking"):
            write_atomic(attack.folder / "attack.yaml", yaml.safe_dump(attack.setting.record(attack.study.study_id)))
            attack_members(attack, datamodule, device)
            for certification in attack.certifications:
                attack_smoothed(attack, certification, datamodule, device)
        report.write(attack)


def member_rows(attack: Attack, norm: str, eps: float, loss: str, correct: torch.Tensor) -> list[dict]:
    """``accuracy.csv``'s rows of every member, from its images' correctness ``[K, n]``."""
    images = correct.shape[1]
    return [
        {"network": attack.network, "corruption": m.corruption.name, "noise_scale": m.noise_scale,
         "seed": m.seed, "norm": norm, "eps": eps, "loss": loss, "images": images, "correct": int(c),
         "acc": repr(int(c) / images)}
        for m, c in zip(attack.study.members, correct.sum(dim=1).tolist())
    ]  # fmt: skip


def attack_members(attack: Attack, datamodule, device: torch.device) -> None:
    """Every member's accuracy on the clean images and under each (norm, ε) not written yet, under PGD with each loss
    and the worst of them per image, all members at once."""
    study, setting = attack.study, attack.setting
    rows = attack.read("accuracy.csv")
    members = len(study.members)
    written = Counter((r["norm"], float(r["eps"])) for r in rows)  # a group is whole with every member's every row
    done = {
        group for group, n in written.items() if n == members * (1 if group[0] == "none" else len(setting.losses) + 1)
    }
    todo = [(norm, eps, pgds) for norm, eps, pgds in setting.attacks() if (norm, eps) not in done]
    rows = [r for r in rows if (r["norm"], float(r["eps"])) in done]  # a group stopped half-way is redone whole
    if ("none", 0.0) in done and not todo:
        say("attack", f"{attack.folder.name}: every attack of this command written earlier")
        return
    positions = evaluation.subset(datamodule.split_size("val"), setting.images)
    images, labels = (t.to(device) for t in evaluation.subset_images(datamodule, positions))
    net = evaluation.members_net(study, study.members, attack.weights, device)
    with torch.no_grad():  # each image's clean answer: an image misclassified clean is never robust
        clean = torch.cat([
            correct(net, images[i : i + 500].expand(members, -1, -1, -1, -1), labels[i : i + 500])
            for i in range(0, len(images), 500)
        ], dim=1).cpu()  # fmt: skip
    if ("none", 0.0) not in done:
        rows += member_rows(attack, "none", 0.0, "none", clean)
        write_atomic(attack.folder / "accuracy.csv", csv_text(ACCURACY_COLUMNS, rows))
    for norm, eps, pgds in todo:
        say("attack", f"{attack.folder.name}: PGD {norm} ε = {eps:g}, {setting.steps} steps, {members} members")
        worst = clean
        for pgd in pgds:
            # each attack's random starts its own: the same whichever attacks run before it, resumed or not
            generator = torch.Generator(device).manual_seed(derive_seed(ATTACK_SEED, norm, eps, pgd.loss))
            right = robust_correct(net, images, labels, pgd, generator=generator).cpu()
            rows += member_rows(attack, norm, eps, pgd.loss, right)
            worst = worst & right
        rows += member_rows(attack, norm, eps, WORST, worst)
        write_atomic(attack.folder / "accuracy.csv", csv_text(ACCURACY_COLUMNS, rows))


def attack_smoothed(attack: Attack, folder: Path, datamodule, device: torch.device) -> None:
    """SmoothAdv against each member a certification certified, at every radius of its summary, on its images,
    ``SMOOTHADV_IMAGES`` at a time; the rows written after each radius (a rerun resumes after the last one)."""
    study, setting = attack.study, attack.setting
    rows = attack.read("smoothadv.csv")
    recorded = read_record(folder / "certify.yaml", CertifySetting.record_like())  # whole: `certifications`
    members = [m for m in study.members if (folder / "members" / f"{m.name}.csv").is_file()]
    certified = {m: read_rows(folder / "members" / f"{m.name}.csv", CERTIFIED) for m in members}
    sigmas = [recorded["sigma"] if recorded["sigma"] is not None else m.noise_scale for m in members]
    largest = max(float(r["radius"]) for member in certified.values() for r in member)
    written = Counter(float(r["radius"]) for r in rows if r["certification"] == folder.name)
    done = {radius for radius, n in written.items() if n == len(members)}  # every member's row of the radius
    rows = [r for r in rows if r["certification"] != folder.name or float(r["radius"]) in done]
    radii = [radius for radius in summary_radii(largest) if radius not in done]
    if not radii:
        return
    positions = [int(r["image"]) for r in certified[members[0]]]
    images, labels = evaluation.subset_images(datamodule, positions)
    file, indices = datamodule.splits["val"]
    index = [int(indices[p]) for p in positions]
    weights = [attack.weights[study.members.index(m)] for m in members]
    net = evaluation.members_net(study, members, weights, device)
    clip = bool(study.resolved.get("data", {}).get("clip", False))
    votes = Votes(net, [m.seed for m in members], sigmas, clip, device, datamodule.classes)
    seeds = list(dict.fromkeys(m.seed for m in members))
    rows_of_seed = [seeds.index(m.seed) for m in members]
    say("attack", f"{attack.folder.name}: SmoothAdv against {folder.name}, {len(members)} members")
    for radius in radii:
        say("attack", f"SmoothAdv at ε = {radius:g}")
        right = torch.zeros(len(members), dtype=torch.long)
        for start in range(0, len(index), SMOOTHADV_IMAGES):
            chunk = index[start : start + SMOOTHADV_IMAGES]
            z = torch.stack([
                torch.stack([seeded(torch.randn, (setting.smoothadv_samples, *images.shape[1:]), "smoothadv", s,
                                    file, i, device=device) for i in chunk], dim=1)
                for s in seeds
            ])[rows_of_seed]  # fmt: skip
            clean = images[start : start + len(chunk)].to(device).expand(len(members), len(chunk), -1, -1, -1)
            targets = labels[start : start + len(chunk)].to(device).expand(len(members), len(chunk))
            adversarial = smoothadv(net, clean, targets, radius, setting.smoothadv_steps, torch.tensor(sigmas), z, clip)
            for b, i in enumerate(chunk):
                counts = votes.count(adversarial[:, b], file, i, "smoothadv", recorded["n"]).cpu()
                right += counts.argmax(dim=1) == int(labels[start + b])
        for k, m in enumerate(members):
            rows.append({
                "certification": folder.name, "network": attack.network, "noise_scale": m.noise_scale,
                "seed": m.seed, "sigma": sigmas[k], "radius": radius, "images": len(index),
                "certified_acc": repr(certified_accuracy(radii_of(certified[m]), radius)),
                "smoothadv_acc": repr(int(right[k]) / len(index)),
            })  # fmt: skip
        write_atomic(attack.folder / "smoothadv.csv", csv_text(SMOOTHADV_COLUMNS, rows))
