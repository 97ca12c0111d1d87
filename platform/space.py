"""Search spaces: ``search_spaces/<task>.yaml`` maps dotted config keys to distributions.

    # python -m platform.tune task=mae
    fixed:                       # every trial of the sweep; before key=value arguments
      train.epochs: 4
    search:
      model.mask_ratio: {uniform: [0.5, 0.9]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.decoder_depth: {int: [1, 3]}
      model.decoder_dim: {choice: [32, 64, 128]}

A key may be searched only when other searched choices hold certain values (a conditional
space, sampled define-by-run by Optuna); otherwise it keeps its default and is not one of the
trial's searched values. Either as a condition on the entry, or as sub-spaces of a choice's options:

    search:
      physics.schedule: {choice: [constant, linear, cosine, step]}
      physics.warmup_epochs: {int: [0, 2], when: {physics.schedule: [linear, cosine, step]}}
      model.name:
        choice:
          resnet18: {model.drop_rate: {uniform: [0.0, 0.3]}}
          resnet10t: {}

Every key and every bound is checked against the task's config before Ray starts: a
trial must never be the first to find out that a value is out of range. So are conditions: on a
searched choice, with values among its options, without cycles.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

from platform import PROJECT_ROOT
from platform import config as config_lib
from platform.config import ConfigError, load_yaml, shown

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution, and the condition under which it is sampled."""

    kind: str  # one of DISTRIBUTIONS
    args: list  # [low, high], or a choice's options
    when: dict = field(default_factory=dict)  # {searched choice key: [values]}: sampled when every one holds

    def holds(self, values: dict) -> bool:
        """Whether its conditions hold for these sampled ``values`` (a key not among them holds none)."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when.items())

    def recorded(self) -> list:
        """What the sweep's parent run records of it (``runs.recorded_space`` reads it back)."""
        return [self.kind, self.args, self.when] if self.when else [self.kind, self.args]


@dataclass(frozen=True)
class SearchSpace:
    path: str
    fixed: dict
    params: dict  # dotted key -> Param, every condition's keys before the keys it governs


def sampled_keys(params: dict, values: dict) -> list[str]:
    """The keys of ``params`` a trial with these ``values`` sampled: those whose conditions hold, on
    keys that were sampled themselves (in any order of ``params``)."""
    def sampled(key: str, seen: tuple = ()) -> bool:
        return key not in seen and params[key].holds(values) and all(
            parent in params and sampled(parent, (*seen, key)) for parent in params[key].when)

    return [key for key in params if sampled(key)]


def sampled_params(params: dict, logged: dict) -> dict:
    """{key: value} of the keys of ``params`` a trial sampled, from its logged MLflow params (strings)."""
    values = {key: config_lib.from_param(logged[key]) for key in params if key in logged}
    return {key: values[key] for key in sampled_keys(params, values)}


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


def _parse_entries(entries: dict, where: str, when: dict, into: dict) -> None:
    """``search:`` entries (or a choice option's sub-space, under ``when``) into {key: Param}."""
    for key, spec in entries.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: search: {key!r} is not a dotted config key; keys are names like train.lr")
        if key in into:
            raise ConfigError(f"{where}: {shown(key)} is searched twice (under two options of a choice?); give it "
                              f"one entry with when: {{<choice key>: [<option>, <option>]}}")
        own = spec.get("when", {}) if isinstance(spec, dict) else {}
        if not isinstance(own, dict) or not all(isinstance(parent, str) for parent in own):
            raise ConfigError(f"{where}: {shown(key)}: when: must map searched choice keys to their values, e.g. "
                              f"when: {{physics.schedule: [linear, cosine]}}; got {own!r}")
        for parent, allowed in own.items():
            if parent in when and when[parent] != allowed:
                raise ConfigError(f"{where}: {shown(key)}: when: {shown(str(parent))} is already set by the choice "
                                  f"it is listed under")
        conditions = {**when, **{parent: allowed if isinstance(allowed, list) else [allowed]
                                 for parent, allowed in own.items()}}
        kind, args, options = _parse_param(key, {k: v for k, v in spec.items() if k != "when"}
                                           if isinstance(spec, dict) else spec, where)
        into[key] = Param(kind, args, conditions)
        for option, sub in (options or {}).items():
            if sub in (None, {}):
                continue
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}: {shown(key)}: option {shown(str(option))}: its sub-space must map dotted "
                                  f"keys to distributions, e.g. {{model.drop_rate: {{uniform: [0.0, 0.3]}}}}")
            _parse_entries(sub, where, {**conditions, key: [option]}, into)


def _check_conditions(params: dict, where: str) -> dict:
    """Every condition on a searched choice and its options, no cycles; returns ``params`` with each
    key after the keys its conditions name (the order define-by-run samples them in)."""
    for key, param in params.items():
        for parent, allowed in param.when.items():
            if parent not in params:
                searched = [k for k, p in params.items() if p.kind == "choice" and k != key]
                raise ConfigError(f"{where}: {shown(key)}: when: {shown(str(parent))} is not searched in this space; "
                                  f"a condition names a searched choice key"
                                  + (f" ({', '.join(searched)})" if searched else ""))
            if params[parent].kind != "choice":
                raise ConfigError(f"{where}: {shown(key)}: when: {parent} is a {params[parent].kind}; a condition "
                                  f"names a searched choice key")
            for value in allowed:
                if value not in params[parent].args:
                    raise ConfigError(f"{where}: {shown(key)}: when: {parent}={shown(str(value))} is not one of its "
                                      f"choices ({', '.join(map(str, params[parent].args))})")
    ordered: dict = {}

    def place(key: str, path: tuple) -> None:
        if key in ordered:
            return
        if key in path:
            raise ConfigError(f"{where}: conditions form a cycle: {' -> '.join((*path[path.index(key):], key))}")
        for parent in params[key].when:
            place(parent, (*path, key))
        ordered[key] = params[key]

    for key in params:
        place(key, ())
    return ordered


def _parse_param(key: str, spec, where: str) -> tuple[str, list, dict | None]:
    """(distribution, arguments, a choice's {option: sub-space} or None) of one entry."""
    key = shown(key)  # for messages: a key with a newline stays on one line
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {key} must be one distribution, e.g. {{uniform: [0.5, 0.9]}} (and when: "
                          f"{{choice key: [values]}}); got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if isinstance(args, dict) and args:  # options with sub-spaces of their own
            options = dict(args)
            args = list(options)
        else:
            options = None
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list of values (or a mapping of options "
                              f"to their sub-spaces)")
        for value in args:  # what Optuna can record as a categorical value
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"{where}: {key}: choice values are numbers, strings, booleans or null; "
                                  f"got {value!r}")
        return kind, args, options
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
    return kind, [low, high], None


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
    params: dict = {}
    _parse_entries(content.get("search") or {}, path, {}, params)
    space = SearchSpace(path, fixed, _check_conditions(params, path))
    _check_against_config(space, task_name, overrides or {})
    return space


def _check_against_config(space: SearchSpace, task_name: str, overrides: dict) -> None:
    """Build the config at every bound and choice, as trials will: unknown keys, wrong types, out-of-range values."""
    config_lib.build(task_name, [overrides])  # the command line's own mistakes are its own
    try:
        config_lib.build(task_name, [space.fixed, overrides])
        for key, param in space.params.items():
            for value in param.args:
                config_lib.build(task_name, [space.fixed, overrides, {key: value}])
    except ConfigError as error:
        raise ConfigError(f"{space.path}: {error}") from None


def sample(trial, params: dict) -> None:
    """Optuna define-by-run: suggest every searched key whose conditions hold (dotted names kept)."""
    for key, param in params.items():
        kind, args = param.kind, param.args
        if not param.holds(trial.params):
            continue  # not sampled: the key keeps its default
        if kind == "uniform":
            trial.suggest_float(key, args[0], args[1])
        elif kind == "loguniform":
            trial.suggest_float(key, args[0], args[1], log=True)
        elif kind == "int":
            trial.suggest_int(key, args[0], args[1])
        else:
            trial.suggest_categorical(key, args)


def allows(param: Param, value) -> bool:
    """Whether ``value`` is one ``param`` can take (a warm start's values from another space)."""
    if param.kind == "choice":
        return value in param.args
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return param.args[0] <= value <= param.args[1] and (param.kind != "int" or int(value) == value)


def define_by_run(space: SearchSpace):
    # A partial of a module-level function: Tune pickles the searcher into its experiment state.
    return functools.partial(sample, params=space.params)


def describe(space: SearchSpace) -> str:
    lines = [f"search space {space.path}:"]
    lines += [f"  {key}: {p.kind}{p.args}" + ("  when " + ", ".join(f"{k} in {v}" for k, v in p.when.items())
                                              if p.when else "") for key, p in space.params.items()]
    lines += [f"  {key} = {value} (fixed)" for key, value in space.fixed.items()]
    return "\n".join(lines)
