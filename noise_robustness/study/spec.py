"""What each option is to a study, declared once: the identity, the resume rule, the ``--compare`` rule, the recipe
note and what ``certify`` takes are all derived from ``OPTIONS``.

An option (a flat key of the resolved config, ``"model.lr"``) is by default part of the study's *identity*: it decides
a result, is recorded in ``study.yaml``, and a command with another value is refused in that folder. ``OPTIONS``
lists the exceptions, each with its reason. A new option needs a line here only if it is not plain identity.
"""

from dataclasses import dataclass

from noise_robustness.machine import describe
from noise_robustness.study.members import sigma_text

ABSENT = object()  # an option that every study has recorded since it existed


@dataclass(frozen=True)
class Role:
    """What an option is to a study.

    Args:
        identity: decides a result: recorded in ``study.yaml``; a command with another value is refused.
        resumable: may change when ``fit --ckpt_path`` resumes a run (train longer, observe differently).
        recipe: decides how the arithmetic runs (rounding, dropout draws), not what is studied: a study compared
            beside another (``--compare``) may differ in it, and the summary says how each was trained.
        before: the value that studies recorded before this option existed ran with; at that value the option is
            left out of the identity, so that those studies keep theirs.
        certify: ``certify`` takes it from its command (the rest of a certification is the study's own).
        instead: an option of the one-run design that a study sets per member: what to use instead.
        describe: how the recipe note names a recipe option's value (``{}``: the value).
        training: decides only how members train: a command that trains none (a gather, a rerun of a finished
            study) takes the study's recorded value, whatever it was given.
    """

    identity: bool = True
    resumable: bool = False
    recipe: bool = False
    before: object = ABSENT
    certify: bool = False
    instead: str | None = None
    describe: str = ""
    training: bool = False


IDENTITY = Role()
RUNTIME = Role(identity=False)  # where or how a command runs, not what it computes
MEMBERS = Role(identity=False)  # which members a study has: each member's file is its own; more train only the new
PER_SEED = "`--seeds` (each member's seed draws its weights, noise, shuffle and dropout)"
MEMBER_OPTIONS = ("scales", "seeds", "corruptions", "members")  # the command's options that name its members

OPTIONS: dict[str, Role] = {
    # the command's own options
    "config": Role(identity=False, certify=True),
    "print_config": Role(identity=False, certify=True),
    "out": Role(identity=False, certify=True),
    "task": RUNTIME,
    "gather": RUNTIME,
    "compare": RUNTIME,
    "reliability_member": RUNTIME,  # which member's reliability diagram the report shows
    "ckpt_path": RUNTIME,
    **{f"{prefix}{key}": MEMBERS for prefix in ("", "data.", "model.") for key in MEMBER_OPTIONS},
    "eval_corruptions": Role(before=None),
    "data.dataset": Role(before=None),  # null: MNIST as shipped; another dataset adds `data.sha256`, what was read
    "model.normalize": Role(before=None),  # null: the images as they are
    # where the data is and what runs it: tasks may run on GPUs and the gather on a CPU
    "data.data_dir": Role(identity=False, certify=True),
    "data.download": RUNTIME,
    "trainer.logger": RUNTIME,
    "trainer.enable_progress_bar": RUNTIME,
    "trainer.enable_model_summary": RUNTIME,
    "trainer.accelerator": Role(identity=False, certify=True),
    "trainer.devices": Role(identity=False, certify=True),
    "trainer.num_nodes": RUNTIME,
    # the same kernels launched from CUDA graphs, in blocks of batches: the same numbers
    "model.graphed": RUNTIME,
    "data.steps_per_batch": RUNTIME,
    # a resumed run may train for more epochs and observe differently
    "trainer.max_epochs": Role(resumable=True),
    "trainer.callbacks": Role(resumable=True),
    # the recipe: how the arithmetic runs
    "model.fast": Role(recipe=True),  # the engine, or torch's own path: other dropout draws, other last bits
    # as asked: `auto` may resolve otherwise on each machine of a cluster, and each member records what it used
    "trainer.precision": Role(recipe=True, training=True),
    "model.dropout_masks": Role(recipe=True, before="per_member", describe="dropout masks {}"),
    "model.compiled": Role(recipe=True, before=False, describe="compiled step (torch.compile)"),
    # options of the one-run design that a study sets per member
    "data.noise_scale": Role(instead="`--scales` (the study's noise levels, e.g. --scales '[1.0]')"),
    "data.noise_seed": Role(instead=PER_SEED),
    "seed_everything": Role(instead=PER_SEED),
    "models": Role(instead="`--model.net` (a study trains one network; run one study per network)"),
}


def role(key: str) -> Role:
    """``key``'s role: its line in ``OPTIONS``, else identity."""
    return OPTIONS.get(key, IDENTITY)


def keys_where(**wanted: bool) -> list[str]:
    """The declared keys whose role has these values, in declaration order: ``keys_where(recipe=True)``."""
    return [key for key, r in OPTIONS.items() if all(getattr(r, name) == value for name, value in wanted.items())]


RECIPE = tuple(keys_where(recipe=True))
RESUMABLE = set(keys_where(resumable=True))
TRAINING = tuple(keys_where(training=True))
CERTIFY = set(keys_where(certify=True))  # besides certify's own arguments
BEFORE = {key: r.before for key, r in OPTIONS.items() if r.before is not ABSENT}
UNSET = "<unset>"  # how a key that one of two configs lacks is shown


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"data": {"clip": False}}`` -> ``{"data.clip": False}``; a ``class_path`` entry stays one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_of(resolved: dict) -> dict[str, object]:
    """The options of a resolved config (nested, as YAML) that decide a study's results, flat."""
    return {k: v for k, v in flatten(resolved).items() if role(k).identity and not (k in BEFORE and v == BEFORE[k])}


def differences(recorded: dict, identity: dict, keys: set[str], now: str) -> list[str]:
    """``"key: <recorded> there, <identity> <now>"`` for each of ``keys`` whose values differ, sorted by key (an
    option an identity leaves out at its ``before`` value shown at that value)."""
    recorded, identity = BEFORE | recorded, BEFORE | identity
    return [
        f"{k}: {recorded.get(k, UNSET)!r} there, {identity.get(k, UNSET)!r} {now}"
        for k in sorted(keys)
        if recorded.get(k, UNSET) != identity.get(k, UNSET)
    ]


def recipe_note(identity: dict, results: list[dict] = ()) -> str | None:
    """How a study's members were trained, where that is not the first recipe (fp32, and every recipe option at the
    value studies ran with before it existed): a line for its summary, naming the precision whenever it names
    anything, or None. Under ``auto`` the precision is each member's own (``results``' ``precision``)."""
    precision = identity.get("trainer.precision") or "32-true"  # null: Lightning's default
    if precision == "auto":
        used = {}
        for row in results:
            used.setdefault(row.get("precision") or "?", []).append(member_label(row))
        precision = (
            f"{next(iter(used))} (`auto`)" if len(used) == 1
            else "`auto`: " + "; ".join(f"{p} for {', '.join(members)}" for p, members in used.items())
        )  # fmt: skip
    if identity.get("model.fast") is False:  # torch's own modules and RMSprop: the engine's options do not apply
        return f"Trained with precision {precision} on torch's own path (`--model.fast false`; this study's members)."
    choices = [
        OPTIONS[key].describe.format(identity[key])
        for key in RECIPE
        if key in BEFORE and identity.get(key, BEFORE[key]) != BEFORE[key]
    ]
    if precisions_used(identity, results) in ("32-true", "32") and not choices:
        return None
    return f"Trained with {', '.join([f'precision {precision}', *choices])} (this study's own members)."


def precisions_used(identity: dict, results: list[dict]) -> str:
    """The precisions a study's members trained in, ``+``-joined: its own under ``auto`` (each member's record, in the
    members' order), else the one it recorded (null: Lightning's default, fp32)."""
    precision = identity.get("trainer.precision") or "32-true"
    if precision != "auto":
        return precision
    return "+".join(dict.fromkeys(p for row in results for p in (row.get("precision") or "?").split("+")))


def member_label(row: dict) -> str:
    """``sigma=0.5/seed=0`` (``impulse=0.1/seed=0`` for another corruption): a result row's member, as named."""
    corruption = row.get("corruption") or "gaussian"
    key = "sigma" if corruption == "gaussian" or float(row["noise_scale"]) == 0 else corruption
    return f"{key}={sigma_text(float(row['noise_scale']))}/seed={row['seed']}"


def machines_note(results: list[dict]) -> str | None:
    """Where the members were trained (``machine.describe`` of each member's ``trained_on``), for the summary: one
    line for one machine, the members of each where several; None where no member records it."""
    machines = {}
    for row in results:
        for where in row.get("trained_on") or [{}]:  # none: a member written before machines were recorded
            machines.setdefault(describe(where), []).append(member_label(row))
    if list(machines) in ([], [describe({})]):
        return None
    if len(machines) == 1:
        return f"Trained on one machine: {next(iter(machines))}."
    return (
        f"Trained on {len(machines)} machines: "
        + "; ".join(f"{where} ({', '.join(members)})" for where, members in machines.items())
        + "."
    )


def check_retired(given: set[str]) -> None:
    """Raises ValueError naming what to use instead of an option of the one-run design among ``given`` keys."""
    for key in sorted(given):
        if role(key).instead:
            raise ValueError(f"`{key}` is set per member by the study: use {role(key).instead} instead")
