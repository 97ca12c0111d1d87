"""MLflow queries: a sweep's parent run and trial runs, its best trial, what a run optimised.

Every search the platform sends to MLflow is built here, its values quoted by ``quoted``: a sweep
named ``o'brien`` finds its runs rather than breaking the filter. Writes live in ``tracking``.
"""

from __future__ import annotations

import json
import math

from platform import objectives, tracking


def quoted(value) -> str:
    """``value`` as a string literal of an MLflow filter. MLflow strips the quotes and unescapes
    nothing, so the quote is one the value does not hold."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"{text!r} holds both quote characters, which no MLflow filter can match; rename it")


def tags_are(tags: dict) -> str:
    return " and ".join(f"tags.`{k}` = {quoted(v)}" for k, v in tags.items())


def find_run(client, experiment: str, tags: dict[str, str]) -> str | None:
    """The id of a run of ``experiment`` with these tags, or None."""
    runs = client.search_runs([experiment], filter_string=tags_are(tags), max_results=1)
    return runs[0].info.run_id if runs else None


def sweep_parent(client, experiment_name: str, sweep: str):
    """The MLflow parent run of the latest sweep of this name, or None (also when there is no store yet)."""
    experiment = client.get_experiment_by_name(experiment_name) if client is not None else None
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=tags_are({tracking.SWEEP_TAG: sweep, tracking.KIND_TAG: "sweep"}),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def sweep_runs(client, experiment: str, sweep: str, status: str | None = None) -> list:
    """The runs tagged with the sweep (its parent and its trials), of one ``status`` when given."""
    query = tags_are({tracking.SWEEP_TAG: sweep}) + (f" and attributes.status = {quoted(status)}" if status else "")
    return client.search_runs([experiment], filter_string=query, max_results=50000)


def trial_runs(client, experiment: str, parent_id: str, status: str | None = None, max_results: int = 50000) -> list:
    """The runs nested under ``parent_id``, oldest first; of one ``status`` when given."""
    query = tags_are({tracking.PARENT_TAG: parent_id}) + (f" and attributes.status = {quoted(status)}" if status else "")
    return client.search_runs([experiment], filter_string=query, order_by=["attributes.start_time ASC"],
                              max_results=max_results)


def best_trial_run(client, experiment: str, parent: str, metric: str, mode: str) -> tuple[str | None, float | None]:
    """(run id, value) of the finished trial run under ``parent`` with the best ``metric``; NaN never counts."""
    scored = [(r.data.metrics[metric], r.info.run_id) for r in trial_runs(client, experiment, parent, "FINISHED")
              if math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        return None, None
    value, run_id = (max if mode == "max" else min)(scored)
    return run_id, value


def finished_runs(client, experiment_ids: list[str]) -> list:
    return client.search_runs(experiment_ids, filter_string="attributes.status = 'FINISHED'", max_results=50000)


def model_versions(client, name: str) -> list:
    """The registered versions of model ``name`` (none when there is no such model)."""
    return client.search_model_versions(f"name={quoted(name)}")


def objective_of(run) -> str | None:
    """The metric a training run optimised: the one it logged as best/<metric>."""
    best = [k[len("best/"):] for k in run.data.metrics if k.startswith("best/")]
    return best[0] if len(best) == 1 else None


def sweep_objective(client, parent) -> str | None:
    """The metric a finished sweep optimised, as its trials logged it (best/<metric>)."""
    trials = trial_runs(client, parent.info.experiment_id, parent.info.run_id, max_results=20)
    return next((objective_of(t) for t in trials if objective_of(t)), None)


def recorded_space(parent) -> dict:
    """{dotted key: space.Param} of the sweep, from its parent run."""
    from platform.space import Param

    recorded = json.loads(parent.data.tags.get(tracking.SPACE_TAG, '{"search": {}}'))["search"]
    return {k: Param(*v) for k, v in recorded.items()}


def at_best_epoch(client, run_id: str, metric: str) -> float | None:
    """The value of ``metric`` the run logged at its best epoch (tag ``platform.best_epoch``), or None."""
    epoch = client.get_run(run_id).data.tags.get("platform.best_epoch")
    values = [m.value for m in client.get_metric_history(run_id, metric) if str(m.step) == epoch]
    return values[-1] if values and math.isfinite(values[-1]) else None


def value_at_best_epoch(client, run, metric: str) -> float:
    """A finished trial's ``metric`` at its best epoch (``model/params`` is the same at every one)."""
    if metric == "model/params":
        return run.data.metrics.get(metric, math.nan)
    value = at_best_epoch(client, run.info.run_id, metric)
    return math.nan if value is None else value


def pareto_trials(client, parent, goals: list, bounds: list) -> list[dict]:
    """One row per finished trial of the sweep, oldest first: its objectives and constrained metrics
    at its best epoch, whether it meets the constraints, and whether it is on the Pareto front."""
    metrics = list(dict.fromkeys([g.metric for g in goals] + [c.metric for c in bounds]))
    rows = []
    for run in trial_runs(client, parent.info.experiment_id, parent.info.run_id, "FINISHED"):
        if tracking.TRIAL_TAG not in run.data.tags:
            continue
        values = {m: value_at_best_epoch(client, run, m) for m in metrics}
        excess = [c.excess(values[c.metric]) for c in bounds]
        rows.append({"trial_id": run.data.tags[tracking.TRIAL_TAG], "run_id": run.info.run_id, **values,
                     "feasible": all(math.isfinite(e) and e <= 0 for e in excess),
                     "stopped_early": run.data.tags.get(tracking.STOPPED_TAG) == "true"})
    front = set(objectives.pareto_front([[r[g.metric] for g in goals] for r in rows], [r["feasible"] for r in rows], goals))
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    return rows
