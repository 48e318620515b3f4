"""What a command may say, checked on its tokens and config files before the parser builds anything.

LightningCLI parses a command into classes; a few rules need the command as the user wrote it: options the study
sets per member (``spec.OPTIONS``' ``instead``), what ``certify`` takes, the corruptions named twice, ``--epochs``.
Each raises ValueError with one message naming the option, the value and what is allowed.
"""

import os
from pathlib import Path

import yaml

from noise_robustness.study.members import distinct
from noise_robustness.study.spec import CERTIFY, check_retired, flatten


def option_values(tokens: list[str], *flags: str) -> list[str]:
    """The values ``tokens`` give any of ``flags``, in order: ``FLAG V``, or ``--FLAG=V`` for a long flag."""
    values = []
    for token, following in zip(tokens, [*tokens[1:], None]):
        name, equals, value = token.partition("=")
        if equals and name.startswith("--") and name in flags:
            values.append(value)
        elif token in flags and following is not None:
            values.append(following)
    return values


def config_files(tokens: list[str]) -> list[dict | None]:
    """The config files named in ``tokens`` (``-c F``, ``--config F``, ``--config=F``), read as YAML; a missing
    one is left to jsonargparse, which names it.

    Raises:
        ValueError: naming a file that is empty or not YAML (jsonargparse names neither).
    """
    configs = []
    for path in option_values(tokens, "-c", "--config"):
        if not os.path.isfile(path):
            continue
        text = Path(path).read_text()
        if not text.strip():
            raise ValueError(f"Expected the config file {path} to hold options, but it is empty")
        try:
            configs.append(yaml.safe_load(text))
        except yaml.YAMLError as err:  # jsonargparse gives line and column, not the file
            message = f"Expected the config file {path} to be YAML, but it does not parse: {err}"
            raise ValueError(message.replace("\n", " ")) from None
    return configs


def check_given(tokens: list[str], configs: list[dict | None], evaluations: dict[str, set[str]]) -> None:
    """Raises ValueError for an option the study sets per member, a sweep's ``ckpt_path``, or an option an evaluation
    of finished studies does not take (``evaluations``: subcommand -> its arguments; each takes ``spec.CERTIFY`` too),
    given in ``tokens`` or a config file."""
    given = {token[2:].split("=", 1)[0] for token in tokens if token.startswith("--")}
    for config in configs:
        given |= set(flatten(config or {}))
    check_retired(given)
    if tokens and tokens[0] == "sweep" and "ckpt_path" in given:
        raise ValueError("`ckpt_path` is chosen by the study: rerun the same sweep command to resume it")
    if tokens and tokens[0] == "sweep" and any(key.rpartition(".")[2] == "members" for key in given):
        raise ValueError(
            "`members` is chosen by the study (the members of `--scales` and `--seeds` not finished yet): name the "
            "levels and seeds instead, or `--task` for one seed"
        )
    if tokens and tokens[0] in evaluations:
        allowed = evaluations[tokens[0]] | CERTIFY
        unknown = sorted(given - allowed - {"help"})
        if unknown:
            takes = ", ".join(f"--{k}" for k in sorted(allowed - {"config", "print_config"}))
            raise ValueError(
                f"`{unknown[0]}` is not an option of `{tokens[0]}`: the network, data and noise are the study's "
                f"(`--out`); {tokens[0]} takes {takes}"
            )


def check_corruptions(tokens: list[str], configs: list[dict | None]) -> None:
    """Builds every corruption named by ``--corruptions`` or ``--eval_corruptions`` (in ``tokens`` or a config file),
    so that an unknown one, a bad severity or one named twice is one message naming the option.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    given = {}
    for key in ("corruptions", "eval_corruptions"):
        for config in configs:
            if isinstance(config, dict) and key in config:
                given[key] = config[key]
        typed = option_values(tokens, f"--{key}")
        if typed:  # the command line's last value wins over the config files'
            given[key] = yaml.safe_load(typed[-1])
    for key, specs in given.items():
        if specs is not None and not isinstance(specs, list):
            raise ValueError(f"Expected `{key}` to be a list of corruptions (or null), but got {specs!r}")
        if specs is not None:
            distinct(specs, key)


def with_epochs_alias(tokens: list[str]) -> list[str]:
    """``sweep --epochs N`` is ``--trainer.max_epochs N`` (the sweep's name for it)."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--epochs" and i + 1 < len(tokens):
            out.append(f"--trainer.max_epochs={tokens[i + 1]}")
            i += 2
            continue
        out.append("--trainer.max_epochs=" + token.split("=", 1)[1] if token.startswith("--epochs=") else token)
        i += 1
    return out
