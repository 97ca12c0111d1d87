"""Several objectives: ``tune.objectives=[val/auc_macro:max,model/params:min]``, constraints, the Pareto front.

A sweep optimises one metric by default, the task's ``val/<metric>``. With ``tune.objectives`` it
optimises several at once (Optuna's multi-objective TPE, or NSGA-II with ``tune.search=nsga2``),
and with ``tune.constraints=[model/params<=5e6]`` it looks only for models that keep to bounds
(Optuna's constraint support: the samplers prefer feasible trials).

What a trial's values are: each metric at the trial's best epoch, the epoch its run keeps (chosen
on ``val/<task metric>`` as in every run), so a Pareto point is the model that would be registered.
Every run logs, besides its task's ``val/`` metrics:

- ``model/params``: the model's parameter count;
- ``model/images_per_s``: inference throughput, forward passes alone over the validation split at
  ``train.batch_size``, on one worker's device (so it does not grow with the number of workers).

At the sweep's end the finished trials' values are read back from MLflow (``runs.pareto_trials``);
those within the constraints that no other such trial beats on every objective form the Pareto
front, each tagged ``platform.pareto=true``; the registered model is the front's trial that
``tune.pick`` chooses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from platform.errors import ConfigError, shown

MODEL_METRICS = {  # logged by every run, whatever its task
    "model/params": "the model's parameter count",
    "model/images_per_s": "inference images/s of one worker (forward passes over the val split)",
}
AT_BEST = "at_best/"  # Tune-only result keys: a metric's value at the run's best epoch so far
PARETO_TAG = "platform.pareto"  # on a trial run: on its sweep's Pareto front
OBJECTIVES_TAG = "platform.objectives"  # on a sweep's parent run: what it optimised ...
CONSTRAINTS_TAG = "platform.constraints"  # ... within which bounds ...
PICK_TAG = "platform.pick"  # ... and which Pareto trial it keeps
PICK_RULES = {
    "first": "the Pareto trial best on the first objective",
    "knee": "the Pareto trial nearest the ideal point, each objective scaled to [0, 1] over the front",
}

_METRIC = re.compile(r"(val/[A-Za-z0-9_.-]+|model/[A-Za-z0-9_]+)")
_OBJECTIVE = re.compile(r"\s*(?P<metric>[^:\s]+)\s*:\s*(?P<mode>\S+)\s*")
_CONSTRAINT = re.compile(r"\s*(?P<metric>[^<>=\s]+)\s*(?P<op><=|>=)\s*(?P<bound>\S+)\s*")


@dataclass(frozen=True)
class Objective:
    metric: str  # val/auc_macro, model/params
    mode: str  # max | min

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # <= or >=
    bound: float

    def excess(self, value: float) -> float:
        """By how much ``value`` breaks the constraint: <= 0 when it holds (Optuna's convention)."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def _checked_metric(metric: str, key: str, text: str) -> str:
    if metric.startswith("test/"):
        raise ConfigError(f"{key}: {shown(text)} is a test metric; the search sees the val split only (the test "
                          f"split is scored once, for the kept model): use val/{metric[len('test/'):]}")
    if not _METRIC.fullmatch(metric) or (metric.startswith("model/") and metric not in MODEL_METRICS):
        raise ConfigError(f"{key}: {shown(text)} names no metric a run logs; expected val/<a metric of the task> "
                          f"(val/auc_macro, val/loss, ...) or one of {', '.join(MODEL_METRICS)}")
    return metric


def parse_objective(text) -> Objective:
    """``val/auc_macro:max`` -> Objective; anything else is a one-line ConfigError."""
    match = _OBJECTIVE.fullmatch(str(text))
    if not match or match["mode"] not in ("max", "min"):
        raise ConfigError(f"tune.objectives: {shown(text)} is not metric:max or metric:min, e.g. "
                          f"tune.objectives=[val/auc_macro:max,model/params:min]")
    return Objective(_checked_metric(match["metric"], "tune.objectives", str(text)), match["mode"])


def parse_constraint(text) -> Constraint:
    """``model/params<=5e6`` -> Constraint; anything else is a one-line ConfigError."""
    match = _CONSTRAINT.fullmatch(str(text))
    bound = None
    if match:
        try:
            bound = float(match["bound"])
        except ValueError:
            pass
    if bound is None or not math.isfinite(bound):
        raise ConfigError(f"tune.constraints: {shown(text)} is not metric<=number or metric>=number, e.g. "
                          f"tune.constraints=[model/params<=5e6]")
    return Constraint(_checked_metric(match["metric"], "tune.constraints", str(text)), match["op"], bound)


def check(key: str, items) -> None:
    """The config check of ``tune.objectives`` and ``tune.constraints``: each item parses; no metric twice."""
    parse = parse_objective if key == "tune.objectives" else parse_constraint
    metrics = [parse(item).metric for item in items]
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice and key == "tune.objectives":
        raise ConfigError(f"tune.objectives names {twice[0]} twice; give each metric once, with max or min")


def objectives_of(cfg, task) -> list[Objective]:
    """What the sweep optimises: ``tune.objectives``, or the task's own metric."""
    if cfg.tune.objectives:
        return [parse_objective(text) for text in cfg.tune.objectives]
    return [Objective(f"val/{task.objective(cfg)}", task.mode)]


def constraints_of(cfg) -> list[Constraint]:
    return [parse_constraint(text) for text in cfg.tune.constraints]


def searched_metrics(cfg) -> list[str]:
    """The metrics a trial reports at its best epoch (``at_best/<metric>``): its objectives' and its
    constraints', when the sweep names any."""
    named = [parse_objective(t).metric for t in cfg.tune.objectives] + [c.metric for c in constraints_of(cfg)]
    return list(dict.fromkeys(named))


def at_best_epoch(wanted: list[str], best_metrics: dict, task_name: str) -> dict:
    """{``at_best/<metric>``: value} of the best epoch's metrics, for Tune (and through it Optuna); a
    metric the task does not log is a one-line error naming those it does."""
    missing = [m for m in wanted if m not in best_metrics]
    if missing:
        logged = ", ".join(sorted(m for m in best_metrics if m.startswith(("val/", "model/"))))
        raise ValueError(f"tune.objectives/tune.constraints name {missing[0]}, which task {task_name} does not log; "
                         f"it logs {logged}")
    return {AT_BEST + m: float(best_metrics[m]) for m in wanted}


def check_logged(cfg, task, logged) -> None:
    """The val/ metrics ``tune.objectives`` and ``tune.constraints`` name, checked before any work
    against ``logged()``: the names a run of the task logs (None: not known before a trial runs,
    which then checks them itself, ``at_best_epoch``)."""
    named = [m for m in searched_metrics(cfg) if m.startswith("val/") and m != f"val/{task.objective(cfg)}"]
    if not named or (names := logged()) is None:
        return
    missing = [m for m in named if m not in names]
    if missing:
        raise ConfigError(f"tune.objectives/tune.constraints name {missing[0]}, which task {task.name} does not log; "
                          f"expected one of {', '.join(sorted(names))}")


def check_search(cfg, task) -> None:
    """What the settings ask of the search, checked before any work (one line each)."""
    objectives = objectives_of(cfg, task)
    several = len(objectives) > 1
    if cfg.tune.search == "nsga2" and not several:
        raise ConfigError("tune.search=nsga2 is a multi-objective search; name two or more objectives, e.g. "
                          "tune.objectives=[val/auc_macro:max,model/params:min], or use tune.search=tpe")
    if cfg.tune.scheduler == "asha" and cfg.tune.objectives and not objectives[0].metric.startswith("val/"):
        raise ConfigError(f"tune.scheduler=asha stops trials on the first objective's value each epoch, and "
                          f"{objectives[0].metric} is not a val/ metric; put a val/ objective first, or set "
                          f"tune.scheduler=none")
    if cfg.tune.pick != "first" and not several:
        raise ConfigError(f"tune.pick={cfg.tune.pick} chooses among a Pareto front; it needs two or more "
                          f"tune.objectives")


def dominates(a: list[float], b: list[float], objectives: list[Objective]) -> bool:
    """Whether values ``a`` are at least as good as ``b`` on every objective and better on one."""
    better = [x > y if o.mode == "max" else x < y for x, y, o in zip(a, b, objectives)]
    worse = [x < y if o.mode == "max" else x > y for x, y, o in zip(a, b, objectives)]
    return any(better) and not any(worse)


def pareto_front(values: list[list[float]], feasible: list[bool], objectives: list[Objective]) -> list[int]:
    """Indices of the feasible points no other feasible point dominates, in their given order."""
    candidates = [i for i, ok in enumerate(feasible) if ok and all(math.isfinite(v) for v in values[i])]
    return [i for i in candidates if not any(dominates(values[j], values[i], objectives) for j in candidates if j != i)]


def pick(values: list[list[float]], front: list[int], objectives: list[Objective], rule: str) -> int:
    """The index (one of ``front``) that ``rule`` chooses; ties go to the earlier trial."""
    if rule == "first":
        sign = 1 if objectives[0].mode == "max" else -1
        return max(front, key=lambda i: (sign * values[i][0], -i))
    # knee: each objective scaled to [0, 1] over the front, 0 its best; the nearest to the ideal (0, ..., 0)
    def scaled(i: int, k: int) -> float:
        column = [values[j][k] for j in front]
        low, high = min(column), max(column)
        if high == low:
            return 0.0
        x = (values[i][k] - low) / (high - low)
        return 1 - x if objectives[k].mode == "max" else x

    return min(front, key=lambda i: (math.fsum(scaled(i, k) ** 2 for k in range(len(objectives))), i))


def sweep_tags(cfg, task) -> dict:
    """The parent run's record of what a sweep with ``tune.objectives`` or ``tune.constraints`` optimised."""
    if not cfg.tune.objectives and not cfg.tune.constraints:
        return {}
    return {OBJECTIVES_TAG: ",".join(str(g) for g in objectives_of(cfg, task)),
            CONSTRAINTS_TAG: ",".join(str(c) for c in constraints_of(cfg)), PICK_TAG: cfg.tune.pick}


def recorded_goals(parent) -> tuple[list[Objective], list[Constraint], str] | None:
    """(objectives, constraints, pick rule) a sweep recorded on its parent run, or None (one metric)."""
    tags = parent.data.tags
    if OBJECTIVES_TAG not in tags:
        return None
    goals = [parse_objective(text) for text in tags[OBJECTIVES_TAG].split(",") if text]
    bounds = [parse_constraint(text) for text in tags.get(CONSTRAINTS_TAG, "").split(",") if text]
    return goals, bounds, tags.get(PICK_TAG, "first")


def picked(rows: list[dict], goals: list[Objective], rule: str) -> dict | None:
    """The row of the Pareto trial ``rule`` keeps, or None when no trial is on the front."""
    front = [i for i, r in enumerate(rows) if r["pareto"]]
    if not front:
        return None
    return rows[pick([[r[g.metric] for g in goals] for r in rows], front, goals, rule)]
