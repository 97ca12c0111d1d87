"""Search spaces: ``search_spaces/<task>.yaml`` maps dotted config keys to distributions.

    # python -m platform.tune task=mae
    fixed:                       # every trial of the sweep; before key=value arguments
      train.epochs: 4
    search:
      model.mask_ratio: {uniform: [0.5, 0.9]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.decoder_depth: {int: [1, 3]}
      model.decoder_dim: {choice: [32, 64, 128]}

Every key and every bound is checked against the task's config before Ray starts: a
trial must never be the first to find out that a value is out of range.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

from platform import PROJECT_ROOT
from platform import config as config_lib
from platform.config import ConfigError, load_yaml, shown

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class SearchSpace:
    path: str
    fixed: dict
    params: dict  # dotted key -> (distribution, arguments)


def default_path(task) -> str:
    """The task's own search space (a plugin ships it), else search_spaces/<task>.yaml here."""
    return task.search_space or os.path.join(PROJECT_ROOT, "search_spaces", f"{task.name}.yaml")


def _number(value, where: str):
    # A quoted "1e-4" is still the number it obviously is.
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number; bounds are numbers, e.g. [0.5, 0.9]")
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{where}: {value!r} is not a finite number; a search needs finite bounds")
    return number


def _parse_param(key: str, spec, where: str) -> tuple[str, list]:
    key = shown(key)  # for messages: a key with a newline stays on one line
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {key} must be one distribution, e.g. {{uniform: [0.5, 0.9]}}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list of values")
        for value in args:  # what Optuna can record as a categorical value
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"{where}: {key}: choice values are numbers, strings, booleans or null; "
                                  f"got {value!r}")
        return kind, args
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {key}: {kind} needs [low, high]; got {args!r}")
    low, high = (_number(a, f"{where}: {key}") for a in args)
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: {key}: int bounds must be integers; got [{low}, {high}]")
        low, high = int(low), int(high)
    if not low < high:
        raise ConfigError(f"{where}: {key}: {kind} needs low < high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {key}: loguniform needs low > 0; got {low}")
    return kind, [low, high]


def load(path: str, task_name: str, overrides: dict | None = None) -> SearchSpace:
    """Read and check a search-space file for ``task_name`` (with the command line's ``overrides``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"tune.space={path}: no such file (each task's default is search_spaces/<task>.yaml)")
    with open(path, "rb") as f:  # bytes: YAML's reader names a byte that is not UTF-8 and where it is
        try:
            content = load_yaml(f) or {}
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping with fixed: and search:, got a {type(content).__name__}")
    unknown = set(map(str, content)) - {"fixed", "search"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {shown(', '.join(sorted(unknown)))}; expected fixed: and search:")
    for section in ("fixed", "search"):
        if not isinstance(content.get(section) or {}, dict):
            raise ConfigError(f"{path}: {section}: must map dotted config keys to values, e.g. train.lr: ...")
        for key in content.get(section) or {}:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: {section}: {key!r} is not a dotted config key; keys are names like "
                                  f"train.lr")
    fixed = dict(content.get("fixed") or {})
    params = {key: _parse_param(key, spec, path) for key, spec in (content.get("search") or {}).items()}
    space = SearchSpace(path, fixed, params)
    _check_against_config(space, task_name, overrides or {})
    return space


def _check_against_config(space: SearchSpace, task_name: str, overrides: dict) -> None:
    """Build the config at every bound and choice, as trials will: unknown keys, wrong types, out-of-range values."""
    config_lib.build(task_name, [overrides])  # the command line's own mistakes are its own
    try:
        config_lib.build(task_name, [space.fixed, overrides])
        for key, (kind, args) in space.params.items():
            for value in args:
                config_lib.build(task_name, [space.fixed, overrides, {key: value}])
    except ConfigError as error:
        raise ConfigError(f"{space.path}: {error}") from None


def sample(trial, params: dict) -> None:
    """Optuna define-by-run: suggest every searched key (dotted names kept)."""
    for key, (kind, args) in params.items():
        if kind == "uniform":
            trial.suggest_float(key, args[0], args[1])
        elif kind == "loguniform":
            trial.suggest_float(key, args[0], args[1], log=True)
        elif kind == "int":
            trial.suggest_int(key, args[0], args[1])
        else:
            trial.suggest_categorical(key, args)


def define_by_run(space: SearchSpace):
    # A partial of a module-level function: Tune pickles the searcher into its experiment state.
    return functools.partial(sample, params=space.params)


def describe(space: SearchSpace) -> str:
    lines = [f"search space {space.path}:"]
    lines += [f"  {key}: {kind}{args}" for key, (kind, args) in space.params.items()]
    lines += [f"  {key} = {value} (fixed)" for key, value in space.fixed.items()]
    return "\n".join(lines)
