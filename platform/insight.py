"""A sweep that explains itself, on its MLflow parent run; ``python -m platform.insight`` for a finished one.

    python -m platform.insight task=classification tune.name=classification-20261122-100342

Everything is read from MLflow alone (the trial runs nested under the parent, the search
space recorded on it), so it works wherever the store is, after the cluster is gone:

- ``trials.csv`` and ``trials.parquet``: one row per trial (its sampled parameters, final and
  best value of the objective, state, epochs run, wall time, why it failed);
- Optuna's optimisation history, hyperparameter importances (fANOVA) and parallel coordinates,
  drawn from a study rebuilt from those rows;
- the best trial's parameters and metrics as the parent's own, so MLflow's compare view lines
  up sweeps side by side;
- a sweep of several objectives (``tune.objectives``): its Pareto front, ``pareto.png`` (the first
  two objectives, at each finished trial's best epoch; the kept trial starred, trials outside
  ``tune.constraints`` crossed) and ``pareto.csv``; the kept trial is the best one above.

Trials ASHA stopped early are in the figures with the best value they reached, marked so in
the table: on a small sweep they are most of the trials, and what they reached is what the
scheduler judged them on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings

from platform import cli, objectives, registry, runs, tracking
from platform import space as space_lib
from platform import config as config_lib

BEST_PARAMS_TAG = "platform.best_params"


def trial_state(run) -> str:
    if run.info.status == "FINISHED":
        return "STOPPED_EARLY" if run.data.tags.get(tracking.STOPPED_TAG) == "true" else "COMPLETE"
    return run.info.status  # FAILED, KILLED, RUNNING


def trial_rows(client, parent, objective: str) -> list[dict]:
    """One dict per trial run nested under ``parent``, oldest first."""
    space = runs.recorded_space(parent)
    trials = runs.trial_runs(client, parent.info.experiment_id, parent.info.run_id)
    rows = []
    for number, run in enumerate(r for r in trials if tracking.TRIAL_TAG in r.data.tags):
        metrics, params = run.data.metrics, run.data.params
        sampled = space_lib.sampled_params(space, params)  # a conditional key it did not sample: None
        end = run.info.end_time or run.info.start_time
        rows.append({
            "number": number,
            "trial_id": run.data.tags[tracking.TRIAL_TAG],
            "run_id": run.info.run_id,
            "state": trial_state(run),
            "epochs": int(metrics.get("epoch", 0)),
            f"final_val/{objective}": metrics.get(f"val/{objective}", math.nan),
            f"best/{objective}": metrics.get(f"best/{objective}", math.nan),
            "duration_s": round((end - run.info.start_time) / 1000, 1),
            **{key: sampled.get(key) for key in space},
            "failure": run.data.tags.get(tracking.FAILURE_TAG, ""),
        })
    return rows


def rebuilt_study(rows: list[dict], space: dict, objective: str, mode: str):
    """An in-memory Optuna study of the trials that reached a value (stopped early ones too)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions = {}
    for key, param in space.items():
        kind, args = param.kind, param.args
        if kind == "choice":
            distributions[key] = CategoricalDistribution(args)
        elif kind == "int":
            distributions[key] = IntDistribution(int(args[0]), int(args[1]))
        else:
            distributions[key] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for row in rows:
        value = row[f"best/{objective}"]
        # The keys this trial sampled: a conditional space's trials differ (importances are then
        # over the keys every trial sampled, Optuna's rule).
        params = {key: row[key] for key in space_lib.sampled_keys(space, row)}
        if not math.isfinite(value) or any(v is None for v in params.values()):
            continue
        if any(d.choices.count(params[k]) == 0 for k, d in distributions.items() if isinstance(d, CategoricalDistribution)):
            continue  # a value outside the recorded choices (a hand-edited run): not this space's trial
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params},
                                                  value=value,
                                                  user_attrs={"state": row["state"], "trial_id": row["trial_id"]}))
    return study


def sweep_figures(study, objective: str) -> tuple[dict, list[str]]:
    """Optuna's three figures, and a line for each one this study cannot have (too few trials)."""
    from platform.plots import pyplot

    pyplot()  # the Agg backend before Optuna's figures: a sweep's driver may have no display
    import optuna.visualization.matplotlib as ovm

    figures, skipped = {}, []
    trials = len(study.trials)
    stopped = sum(t.user_attrs.get("state") == "STOPPED_EARLY" for t in study.trials)
    note = f"{trials} trials, {stopped} stopped early (at their best value)" if stopped else f"{trials} trials"
    searched = len(study.trials[0].distributions) if trials else 0
    plans = {
        "optimization_history.png": (1, lambda: ovm.plot_optimization_history(study, target_name=f"best/{objective}")),
        "param_importances.png": (2, lambda: ovm.plot_param_importances(study)),
        "parallel_coordinate.png": (2, lambda: ovm.plot_parallel_coordinate(study, target_name=f"best/{objective}")),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        for name, (needs, draw) in plans.items():
            if trials < needs or (name == "param_importances.png" and searched < 1):
                skipped.append(f"{name}: needs {needs} trials with a value, the sweep has {trials}")
                continue
            try:
                axes = draw()
            except Exception as error:  # fANOVA on trials that all scored the same: no variance to split
                skipped.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(9.0 if name == "parallel_coordinate.png" else 6.5, 4.5)
            figure.suptitle(f"{name[:-4].replace('_', ' ')}: {note}", fontsize=9)
            figure.tight_layout()
            figures[name] = figure
    return figures, skipped


def write_table(rows: list[dict], folder: str) -> list[str]:
    import pandas as pd

    table = pd.DataFrame(rows)
    paths = [os.path.join(folder, "trials.csv"), os.path.join(folder, "trials.parquet")]
    table.to_csv(paths[0], index=False)
    # Parquet wants one type per column: a choice of mixed values is stored as text.
    table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(paths[1], index=False)
    return paths


def best_row(rows: list[dict], objective: str, mode: str) -> dict | None:
    scored = [r for r in rows if r["state"] in ("COMPLETE", "STOPPED_EARLY") and math.isfinite(r[f"best/{objective}"])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[f"best/{objective}"])


def log_sweep_insight(client, parent_id: str, objective: str, mode: str) -> list[str]:
    """Trials table, Optuna figures and the best trial's params and metrics, on the parent run;
    ``objective`` is the metric the sweep optimised (``val/`` left off), ``mode`` min or max.

    Returns lines worth printing (what is missing and why).
    """
    parent = client.get_run(parent_id)
    space = runs.recorded_space(parent)
    rows = trial_rows(client, parent, objective)
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        if rows:
            for path in write_table(rows, folder):
                tracking.log_file(client, parent_id, path, "")

    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "STOPPED_EARLY", "FAILED", "KILLED")}
    sweep_metrics = {"sweep/trials": len(rows), "sweep/complete": counts["COMPLETE"],
                     "sweep/stopped_early": counts["STOPPED_EARLY"], "sweep/failed": counts["FAILED"],
                     "sweep/killed": counts["KILLED"]}
    best = best_row(rows, objective, mode)
    goals = objectives.recorded_goals(parent)
    if goals and parent.data.tags.get("platform.best_run_id"):  # the Pareto trial tune.pick kept
        best = next((r for r in rows if r["run_id"] == parent.data.tags["platform.best_run_id"]), best)
    if best is not None:
        best_run = client.get_run(best["run_id"])
        # Its last epoch's validation metrics, and the best value of the objective it reached.
        sweep_metrics.update({k: v for k, v in best_run.data.metrics.items() if k.startswith(("val/", "best/"))})
        sampled = {key: best[key] for key in space if best[key] is not None}  # what the best trial sampled
        recorded = parent.data.params
        # MLflow params never change: a sweep extended later whose best trial changed keeps
        # its first values there; the tag and the metrics always name the current best.
        new = {k: v for k, v in sampled.items() if k not in recorded}
        tracking.log_params(client, parent_id, new)
        changed = [k for k in sampled if k in recorded and recorded[k] != str(sampled[k])]
        if changed:
            notes.append(f"the parent run already had params {', '.join(changed)} with other values (MLflow params "
                         f"never change); tag {BEST_PARAMS_TAG} and the metrics hold the best trial's")
        tracking.set_tags(client, parent_id, {BEST_PARAMS_TAG: json.dumps(sampled, default=str)})
    tracking.log_metrics(client, parent_id, sweep_metrics, step=0)

    # The figures last: the table, params and metrics are there even if one cannot be drawn.
    figures, skipped = sweep_figures(rebuilt_study(rows, space, objective, mode), objective)
    if goals:
        figures.update(pareto_insight(client, parent, *goals))
    tracking.log_figures(client, parent_id, figures, folder="sweep")
    return notes + skipped


def pareto_insight(client, parent, goals: list, bounds: list, rule: str) -> dict:
    """``pareto.csv`` on the parent run, and with two objectives or more its figure."""
    import pandas as pd

    rows = runs.pareto_trials(client, parent, goals, bounds)
    kept = parent.data.tags.get("platform.best_run_id")
    for row in rows:
        row["kept"] = row["run_id"] == kept
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pareto.csv")
        pd.DataFrame(rows).to_csv(path, index=False)
        tracking.log_file(client, parent.info.run_id, path, "")
    if len(goals) < 2 or not rows:
        return {}
    return {"pareto.png": pareto_figure(rows, goals, bounds, rule)}


def pareto_figure(rows: list[dict], goals: list, bounds: list, rule: str):
    """The first two objectives of every finished trial; the front joined up, the kept trial starred."""
    from platform.plots import pyplot

    plt = pyplot()
    x, y = goals[0], goals[1]
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    others = [r for r in rows if not r["pareto"]]
    for feasible, marker in ((True, "o"), (False, "x")):
        chosen = [r for r in others if r["feasible"] == feasible]
        if chosen:
            axes.scatter([r[x.metric] for r in chosen], [r[y.metric] for r in chosen], c="0.6", marker=marker,
                         label="other trials" if feasible else "outside tune.constraints")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r[x.metric])
    axes.plot([r[x.metric] for r in front], [r[y.metric] for r in front], "o-", color="tab:red",
              drawstyle="steps-post" if len(goals) == 2 else "default", label="Pareto front")
    for r in front:
        axes.annotate(r["trial_id"], (r[x.metric], r[y.metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    kept = [r for r in rows if r.get("kept")]
    if kept:
        axes.scatter([kept[0][x.metric]], [kept[0][y.metric]], marker="*", s=250, color="gold", edgecolors="k",
                     zorder=5, label=f"kept (tune.pick={rule})")
    axes.set_xlabel(f"{x.metric} ({x.mode})")
    axes.set_ylabel(f"{y.metric} ({y.mode})")
    shown = f"; {len(goals) - 2} more objectives not drawn" if len(goals) > 2 else ""
    limits = f"; {', '.join(str(b) for b in bounds)}" if bounds else ""
    axes.set_title(f"Pareto front: {len(front)} of {len(rows)} finished trials, at their best epoch{limits}{shown}",
                   fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def main(argv: list[str]) -> int:
    task_name, overrides = config_lib.parse_cli(argv)
    cfg = config_lib.build(task_name, [overrides])
    task = registry.task_of(cfg)
    if not cfg.tune.name:
        raise config_lib.ConfigError("platform.insight needs tune.name=<the sweep's name> (its MLflow parent run's "
                                     "name, printed when the sweep started)")
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    experiment_name = cfg.mlflow.experiment or f"deeplense-{cfg.task}"
    if not tracking.store_exists(uri):
        raise config_lib.ConfigError(f"mlflow.tracking_uri={uri}: no MLflow store there")
    client = tracking.MlflowClient(uri)
    parent = runs.sweep_parent(client, experiment_name, cfg.tune.name)
    if parent is None:
        raise config_lib.ConfigError(f"tune.name={cfg.tune.name}: no sweep of that name in experiment "
                                     f"{experiment_name} of {uri}")
    # The sweep's own objective: a setting may choose it (mae_finetune's head), and this command's may differ.
    objective = runs.sweep_objective(client, parent) or task.objective(cfg)
    for line in log_sweep_insight(client, parent.info.run_id, objective, task.mode):
        print(f"note: {line}")
    print(f"sweep {cfg.tune.name}: trials table and figures logged on MLflow parent run {parent.info.run_id}")
    print(cli.ui_hint(uri, parent.info.experiment_id, parent.info.run_id))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
